"""What the llama.cpp runtime loads besides the GGUF file itself: its tokenizer.

llama.cpp runs the GGUF as it is; the engine still needs a Hugging Face tokenizer (chat
template, detokenizing), which transformers builds from the GGUF file in about 6 s.  It is
built once and saved to a tokenizer-only cache entry (keyed by the file), so later loads
take about a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from batchserve.cache import default_cache_dir, file_key

log = logging.getLogger("batchserve.generation")


def tokenizer_dir(gguf: Path, cache_dir: Path) -> Path:
    """Where the tokenizer of ``gguf`` is cached: keyed by the file's name, size and mtime."""
    return cache_dir / "models" / f"{gguf.stem}-{file_key(gguf)}-tokenizer"


def load_gguf_tokenizer(gguf: Path, cache_dir: Path | None = None):
    """The Hugging Face tokenizer of ``gguf``, without its weights: from the cache, else built
    from the file and cached (a cache that cannot be written only costs the next load time)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    target = tokenizer_dir(gguf, Path(cache_dir) if cache_dir else default_cache_dir())
    if (target / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(target, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as error:  # a read-only cache: build it again next time
        log.warning("cannot cache the tokenizer of %s under %s: %s", gguf.name, target.parent, error)
        return tokenizer
    try:
        tokenizer.save_pretrained(scratch)
        scratch.rename(target)
    except OSError:  # another process finished first (or the disk refused): theirs, or none, is fine
        pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return tokenizer
