"""Backend names → classes: the one list a new backend is added to.

Each class builds itself from the settings with :meth:`Backend.from_settings`, so adding a
backend is one module (a :class:`~batchserve.backends.base.Backend` subclass) plus one line
in :data:`BACKENDS` (and its name in :class:`~batchserve.settings.BackendKind`).  Classes
are imported when first asked for: a server that never uses Redis never imports redis-py.
"""

from __future__ import annotations

import importlib
from typing import Any

from batchserve.backends.base import Backend
from batchserve.model import ModelSpec
from batchserve.settings import BackendKind, Settings

BACKENDS: dict[BackendKind, str] = {
    BackendKind.thread: "batchserve.backends.thread:ThreadBackend",
    BackendKind.process: "batchserve.backends.process:ProcessBackend",
    BackendKind.redis: "batchserve.backends.redis:RedisBackend",
}


def backend_class(kind: BackendKind | str) -> type[Backend]:
    try:
        reference = BACKENDS[BackendKind(kind)]
    except ValueError:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(k.value for k in BACKENDS)}") from None
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def create_backend(spec: ModelSpec, settings: Settings, name: str) -> Backend:
    """The backend ``settings.backend`` names, running the model ``spec`` (called ``name``)."""
    return backend_class(settings.backend).from_settings(spec, settings, name)


def as_backend(model: Any) -> Backend:
    """A ready backend as it is; anything else (a model, a :class:`ModelSpec`) on a thread."""
    if isinstance(model, Backend):
        return model
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
    return backend_class(BackendKind.thread)(spec)
