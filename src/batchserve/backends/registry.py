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
from batchserve.extras import needs_extra
from batchserve.model import ModelSpec
from batchserve.settings import BackendKind, Settings

BACKENDS: dict[BackendKind, str] = {
    BackendKind.thread: "batchserve.backends.thread:ThreadBackend",
    BackendKind.process: "batchserve.backends.process:ProcessBackend",
    BackendKind.redis: "batchserve.backends.redis.front:RedisBackend",
}
#: a backend whose packages come with an extra (``pip install 'batchserve[redis]'``); the others are the core's
EXTRA_OF: dict[BackendKind, str] = {BackendKind.redis: "redis"}


def backend_class(kind: BackendKind | str) -> type[Backend]:
    """The class of backend ``kind``, imported now; one whose extra is not installed raises
    :class:`~batchserve.extras.MissingExtraError` naming it."""
    try:
        known = BackendKind(kind)
    except ValueError:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(k.value for k in BACKENDS)}") from None
    module, _, name = BACKENDS[known].partition(":")
    found: type[Backend]
    if known not in EXTRA_OF:
        found = getattr(importlib.import_module(module), name)
    else:
        with needs_extra(EXTRA_OF[known], f"the {known.value} backend"):
            found = getattr(importlib.import_module(module), name)
    return found


def create_backend(spec: ModelSpec, settings: Settings, name: str) -> Backend:
    """The backend ``settings.backend`` names (unset: :func:`auto_layout`'s), running the model ``spec`` (called ``name``)."""
    if settings.backend is None:
        settings = auto_layout(spec, settings)
    assert settings.backend is not None  # auto_layout chose one
    return backend_class(settings.backend).from_settings(spec, settings, name)


def auto_layout(spec: ModelSpec, settings: Settings) -> Settings:
    """The settings with a backend chosen for ``spec`` on this machine (``--backend`` unset).

    A model that declares ``cpu_processes = True`` (the bundled sentence encoder) runs in the
    process backend with one single-threaded worker per core (``--workers`` if given), when the
    machine has no GPU, this process may use 2 or more cores (affinity and cgroup quota,
    :func:`~batchserve.devices.cpu_count`) and one HTTP process serves (with several, each
    already has its own model).  On 2 cores, 2 processes x 1 thread ran 1.3-1.5x the sentences
    of 1 process x 2 threads with ONNX Runtime and 4x with torch (README, "CPU layout").
    Everything else runs on the thread backend, as before.
    """
    from batchserve.devices import cpu_count, gpu_count

    process = settings.process
    cores = cpu_count()
    wanted = (
        spec.declared("cpu_processes") is True
        and settings.server.http_workers == 1
        and process.devices == ["cpu"]
        and cores >= 2
        and gpu_count() == 0
    )
    if not wanted:
        return settings.model_copy(update={"backend": BackendKind.thread})
    workers = process.workers if process.workers > 1 else cores
    return settings.model_copy(
        update={"backend": BackendKind.process, "process": process.model_copy(update={"workers": workers})}
    )


def as_backend(model: Any) -> Backend:
    """A ready backend as it is; anything else (a model, a :class:`ModelSpec`) on a thread."""
    if isinstance(model, Backend):
        return model
    from batchserve.backends.thread import ThreadBackend

    return ThreadBackend(model if isinstance(model, ModelSpec) else ModelSpec(model))
