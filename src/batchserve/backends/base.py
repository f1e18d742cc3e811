"""The one interface every backend (thread, process, redis) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from batchserve.devices import fork_safe_loading
from batchserve.model import Model, ModelSpec

if TYPE_CHECKING:
    from batchserve.settings import Settings

#: While :meth:`Backend.run` runs: the latest deadline (event-loop time) among the requests
#: in the batch, so a backend that sends batches elsewhere (redis) can send it along.
batch_deadline: ContextVar[float | None] = ContextVar("batch_deadline", default=None)


@dataclass(frozen=True)
class Backlog:
    """Work queued outside this process for a backend's remote workers (redis: the model's
    request stream), as sampled by :meth:`Backend.backlog`."""

    entries: int  #: batches in the queue: waiting for a worker, or read by one and not yet answered
    pending: int  #: of those, read by a worker and not yet answered
    workers: int  #: live workers serving the queue
    offline_entries: int = 0  #: of ``entries``, offline batches (redis: the model's offline stream)
    offline_pending: int = 0  #: of ``pending``, offline batches


class Backend(ABC):
    """Runs batches on a model somewhere: a thread, worker processes or remote workers.

    The :class:`~batchserve.batching.Batcher` calls :meth:`run` at most :attr:`capacity`
    times at once, so a backend with one slot per worker always has a free worker when
    a batch arrives.  A backend that gains or loses slots (a worker died or came back)
    calls the listener given to :meth:`on_capacity_change`.
    """

    _capacity_listener: Callable[[], None] | None = None

    @classmethod
    def from_settings(cls, spec: ModelSpec, settings: "Settings", name: str) -> "Backend":
        """This backend for the model ``spec`` (called ``name``), configured by ``settings``."""
        raise NotImplementedError(f"{cls.__name__} is not built from settings")

    def preload(self) -> None:
        """Load in this process, before it forks, what forked processes should share.

        Called (blocking) by the gunicorn master with ``--http-workers``; most backends
        need nothing here.  :meth:`start` still runs in each forked process.
        """

    @abstractmethod
    async def start(self) -> None:
        """Load the model(s); return when at least one slot can run a batch."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many batches can run at once right now."""

    @abstractmethod
    async def run(self, batch: list[Any]) -> list[Any]:
        """Run ``predict(batch)`` on a free slot and return its outputs.

        Raises :class:`~batchserve.errors.WorkerDiedError` when the worker died under
        the batch (the batcher retries once), or the model's own exception.
        """

    async def close(self) -> None:
        """Stop workers and free resources."""

    def describe(self) -> dict[str, Any]:
        """Facts for ``/readyz`` (kind, workers up, ...)."""
        return {"capacity": self.capacity}

    async def backlog(self) -> Backlog | None:
        """The queue outside this process, sampled now (a round trip: call it now and then,
        never per request); None for backends that queue nothing elsewhere, or cannot tell now."""
        return None

    def on_capacity_change(self, listener: Callable[[], None]) -> None:
        self._capacity_listener = listener

    def _capacity_changed(self) -> None:
        if self._capacity_listener is not None:
            self._capacity_listener()


def load_before_fork(spec: ModelSpec) -> Model:
    """Build and load the model in a process about to fork (CPU, one torch thread), for
    backends whose forked processes share its weights."""
    with fork_safe_loading():
        model = spec.build()
        model.load()
    return model


def model_facts(model: Model | None) -> dict[str, Any]:
    """What a loaded model says about itself for ``/readyz`` (its ``describe()``, if it has one)."""
    instance = getattr(model, "instance", None)
    describe = getattr(instance, "describe", None)
    if not callable(describe):
        return {}
    try:
        facts = describe()
    except Exception:  # noqa: BLE001 - /readyz must answer whatever a model's describe does
        return {}
    return {"model": facts} if isinstance(facts, dict) and facts else {}
