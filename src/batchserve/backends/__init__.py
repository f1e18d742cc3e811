"""Where batches run: a thread (:mod:`.thread`), worker processes, or remote workers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchserve.backends.base import Backend
from batchserve.backends.thread import ThreadBackend
from batchserve.model import ModelSpec

if TYPE_CHECKING:
    from batchserve.server.settings import Settings

__all__ = ["Backend", "ThreadBackend", "create_backend"]

KINDS = ("thread",)


def create_backend(spec: ModelSpec, settings: "Settings", name: str) -> Backend:
    """The backend the settings name (``thread`` today), running the model ``spec``."""
    if settings.backend == "thread":
        return ThreadBackend(spec)
    raise ValueError(f"unknown backend {settings.backend!r}; choose one of {', '.join(KINDS)}")
