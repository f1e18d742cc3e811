"""What the llama.cpp runtime loads besides the GGUF file itself: its tokenizer.

llama.cpp runs the GGUF as it is; the engine still needs a Hugging Face tokenizer (chat
template, detokenizing), which transformers builds from the GGUF file in about 6 s.  It is
built once and saved to a tokenizer-only cache entry (keyed by the file), so later loads
take about a second.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from batchserve.cache import default_cache_dir, file_key, write_entry

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
    if has_tokenizer(target):
        return AutoTokenizer.from_pretrained(target, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        write_entry(target, tokenizer.save_pretrained, has_tokenizer)
    except OSError as error:  # a read-only or full cache: build it again next time
        log.warning("cannot cache the tokenizer of %s under %s: %s", gguf.name, target.parent, error)
    return tokenizer


def has_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` holds a complete saved tokenizer."""
    return (directory / "tokenizer_config.json").is_file()
