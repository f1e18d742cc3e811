"""Find, convert and load the causal language model the generation engine runs.

The bundled model (:mod:`batchserve.runtimes.bundled`) is a quantized GGUF file.
Dequantizing GGUF takes tens of seconds, so it is done once: the weights go to a
safetensors directory under the cache dir (with the tokenizer, also built from the GGUF
file) and every later load reads that directory (memory-mapped, about a second).  Any local
Hugging Face causal-LM directory can be loaded instead.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchserve.cache import default_cache_dir, file_key, write_entry
from batchserve.runtimes.bundled import BUNDLED_NAME, bundled_gguf_path

log = logging.getLogger("batchserve.generation")

@dataclass
class LoadedModel:
    """A causal LM ready for the engine, and how it was obtained."""

    model: Any
    tokenizer: Any
    name: str
    path: str
    load_seconds: float
    converted_seconds: float | None = None  # set when this load had to dequantize the GGUF


def converted_dir(gguf: Path, cache_dir: Path) -> Path:
    """Where the safetensors copy of ``gguf`` lives: keyed by name, size and mtime."""
    return cache_dir / "models" / f"{gguf.stem}-{file_key(gguf)}"


def dequantize_gguf(gguf: Path, target: Path) -> float:
    """Write the GGUF model (float32 weights) and its tokenizer to ``target``; returns seconds.

    A cache entry (:func:`~batchserve.cache.write_entry`): concurrent processes never see
    half a copy, and the first to finish wins.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(scratch: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are dequantized already; drop the GGUF marker so the copy is a plain checkpoint
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)

    started = time.perf_counter()
    write_entry(target, build, is_converted)
    return time.perf_counter() - started


def is_converted(directory: Path) -> bool:
    """Whether ``directory`` holds a complete converted model."""
    return (directory / "config.json").is_file()


def ensure_converted(gguf: Path, cache_dir: Path | None = None) -> tuple[Path, float | None]:
    """The safetensors directory for ``gguf``, converting it first if needed."""
    target = converted_dir(gguf, Path(cache_dir) if cache_dir else default_cache_dir())
    if is_converted(target):
        return target, None
    log.warning("dequantizing %s into %s (once)", gguf.name, target)
    seconds = dequantize_gguf(gguf, target)
    log.warning("dequantized %s in %.1f s", gguf.name, seconds)
    return target, seconds


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
