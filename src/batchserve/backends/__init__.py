"""Where batches run: a thread (:mod:`.thread`), supervised worker processes (:mod:`.process`), or remote
workers through Redis (:mod:`.redis`).

One interface (:class:`Backend`, in :mod:`.base`); the names are in :mod:`.registry`.
"""

from __future__ import annotations

from batchserve.backends.base import Backend
from batchserve.backends.process import ProcessBackend
from batchserve.backends.registry import BACKENDS, as_backend, backend_class, create_backend
from batchserve.backends.thread import ThreadBackend

__all__ = ["BACKENDS", "Backend", "ProcessBackend", "ThreadBackend", "as_backend", "backend_class", "create_backend"]
