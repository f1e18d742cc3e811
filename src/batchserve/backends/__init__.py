"""Where batches run: a thread (:mod:`.thread`), supervised worker processes (:mod:`.process`), or remote workers through Redis (:mod:`.redis`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchserve.backends.base import Backend
from batchserve.backends.process import ProcessBackend
from batchserve.backends.thread import ThreadBackend
from batchserve.model import ModelSpec

if TYPE_CHECKING:
    from batchserve.server.settings import Settings

__all__ = ["Backend", "ProcessBackend", "ThreadBackend", "create_backend"]

KINDS = ("thread", "process", "redis")


def create_backend(spec: ModelSpec, settings: "Settings", name: str) -> Backend:
    """The backend the settings name, running the model ``spec``."""
    if settings.backend == "thread":
        return ThreadBackend(spec)
    if settings.backend == "process":
        return ProcessBackend(
            spec,
            workers=settings.workers,
            devices=settings.devices,
            threads_per_worker=settings.threads_per_worker,
            max_batches=settings.max_batches_per_worker,
            name=name,
        )
    if settings.backend == "redis":
        return _redis_backend(spec, settings, name)
    raise ValueError(f"unknown backend {settings.backend!r}; choose one of {', '.join(KINDS)}")


def _redis_backend(spec: ModelSpec, settings: "Settings", name: str) -> Backend:
    """The front of remote workers (``batchserve worker``); ``spec`` runs there, not here."""
    from batchserve.backends.redis import RedisBackend

    if not settings.redis_url:
        raise ValueError("--backend redis needs --redis-url")
    return RedisBackend(
        settings.redis_url, name, prefix=settings.redis_prefix,
        max_inflight=settings.max_queue_size, default_timeout=settings.timeout,
    )
