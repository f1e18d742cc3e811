"""Thread backend: one model instance in one dedicated thread of this process."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from batchserve.backends.base import Backend, load_before_fork, model_facts
from batchserve.model import Model, ModelSpec

if TYPE_CHECKING:
    from batchserve.settings import Settings


class ThreadBackend(Backend):
    """Loads and runs the model in its own thread, so the event loop never blocks."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.model: Model | None = None
        self._preloaded: Model | None = None
        self._executor: ThreadPoolExecutor | None = None

    def preload(self) -> None:
        """Load the model now, in a process about to fork (CPU, one torch thread)."""
        self._preloaded = load_before_fork(self.spec)

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchserve-model")
        model, self._preloaded = self._preloaded, None
        if model is None:
            model = self.spec.build()
            await asyncio.get_running_loop().run_in_executor(self._executor, model.load)
        self.model = model
        self._capacity_changed()

    @property
    def capacity(self) -> int:
        return 1 if self.model is not None else 0

    @classmethod
    def from_settings(cls, spec: ModelSpec, settings: "Settings", name: str) -> "ThreadBackend":
        return cls(spec)

    async def run(self, batch: list[Any]) -> list[Any]:
        assert self._executor is not None and self.model is not None, "backend not started"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.model.predict, batch)

    async def close(self) -> None:
        self.model = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def describe(self) -> dict[str, Any]:
        return {"backend": "thread", "workers": 1, "workers_up": self.capacity, **model_facts(self.model)}
