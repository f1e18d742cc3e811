"""Where batchserve keeps what it builds once and reuses (converted and exported models).

Both caches (the generation engine's safetensors copy of a GGUF file, the ONNX export of an
encoder) are written the same way: into a temporary sibling directory, which is renamed into
place only when complete, so a process killed mid-way never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$BATCHSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/batchserve``, else ``~/.cache/batchserve``."""
    explicit = os.environ.get("BATCHSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchserve"


def file_key(path: Path) -> str:
    """A short key for a cache entry made from the file at ``path``: its resolved name, size
    and modification time, so an entry made from a file that changed is never reused."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
