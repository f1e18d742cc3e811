"""Where batchserve keeps what it builds once and reuses (converted and exported models).

Every cache entry (the torch runtime's safetensors copy of a GGUF file, the llama.cpp
runtime's tokenizer, the ONNX export of an encoder) is a directory written by
:func:`write_entry`: into a temporary sibling directory, which is renamed into place only
when complete, so a process killed mid-way never leaves a half-written entry, and
concurrent writers end with one whole entry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


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


def write_entry(target: Path, build: Callable[[Path], object], complete: Callable[[Path], bool]) -> bool:
    """Write the cache entry ``target`` (a directory) whole or not at all.

    ``build(scratch)`` fills a new temporary sibling directory (``.<name>-...``: hidden, never
    taken for an entry), which is renamed to ``target`` once ``build`` returns.  A build that
    raises leaves nothing (the error propagates); a process killed mid-way leaves only its
    hidden scratch directory, never an entry.  ``complete(target)`` says whether an entry is
    whole: one that is already complete is kept and nothing is built; an incomplete or stale
    one under the same name is replaced.  Concurrent writers each build their own; the first
    rename wins and the others keep its entry (if it is not complete, the rename's error is
    raised).  Returns True when this call's build became the entry.
    """
    if complete(target):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not complete(target):
        _remove(target)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(scratch)
        try:
            scratch.rename(target)
        except OSError:  # another writer renamed theirs first: keep it if it is whole
            if not complete(target):
                raise
            return False
        return True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _remove(entry: Path) -> None:
    """Take ``entry`` out of its place at once (a rename), then delete it: a writer renaming
    its entry into place meanwhile never meets a half-deleted directory."""
    aside = Path(tempfile.mkdtemp(prefix=f".{entry.name}-stale-", dir=entry.parent))
    try:
        entry.rename(aside / "entry")
    except FileNotFoundError:  # another writer removed it first
        pass
    finally:
        shutil.rmtree(aside, ignore_errors=True)
