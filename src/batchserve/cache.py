"""Where batchserve keeps what it builds once and reuses (converted and exported models).

Both caches (the generation engine's safetensors copy of a GGUF file, the ONNX export of an
encoder) are written the same way: into a temporary sibling directory, which is renamed into
place only when complete, so a process killed mid-way never leaves a half-written entry.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$BATCHSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/batchserve``, else ``~/.cache/batchserve``."""
    explicit = os.environ.get("BATCHSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchserve"
