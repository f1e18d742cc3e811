"""Facts about running processes, read from Linux's ``/proc``: children and memory (PSS);
and giving a process's free heap back to the system.

PSS (proportional set size) charges each shared page to the processes sharing it in equal
parts, so the PSS of a server's processes adds up to the memory they really use together:
the right figure for "N workers share one copy of the weights".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (empty when it is gone)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as file:
                found += [int(child) for child in file.read().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Children, grandchildren... of ``pid``."""
    found, todo = [], children(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children(child)
    return found


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process, from ``/proc/PID/smaps_rollup`` (0 if gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pss_bytes(pid: int) -> int:
    """Total PSS of ``pid`` and all its descendants."""
    return sum(pss_bytes(each) for each in [pid, *descendants(pid)])


def state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``Z`` for a zombie), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0]
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    library = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the free pages of the C heap to the system (glibc's ``malloc_trim``).

    Tensors of ever-changing shapes (KV caches, logits) leave the heap fragmented, so freed
    memory stays in the process's RSS until it is trimmed.  False where there is no glibc.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
