"""The thread backend: one model in one dedicated thread of this process."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from batchserve.backends.thread import ThreadBackend
from batchserve.model import ModelSpec


class WhereAmI:
    """Records where it was loaded and run."""

    loads: list[tuple[int, str]] = []

    def load(self) -> None:
        type(self).loads.append((os.getpid(), threading.current_thread().name))

    def predict(self, batch: list) -> list:
        if "slow" in batch:
            time.sleep(0.3)
        return [threading.current_thread().name for _ in batch]


@pytest.fixture(autouse=True)
def fresh_loads():
    WhereAmI.loads = []


async def test_the_model_loads_and_runs_in_one_thread_off_the_loop():
    backend = ThreadBackend(ModelSpec(WhereAmI))
    changes: list[int] = []
    backend.on_capacity_change(lambda: changes.append(backend.capacity))
    assert backend.capacity == 0 and backend.describe() == {"backend": "thread", "workers": 1, "workers_up": 0}
    await backend.start()
    try:
        assert backend.capacity == 1 and changes == [1] and backend.describe()["workers_up"] == 1
        names = await backend.run([1, 2]) + await backend.run([3])
        assert len(set(names)) == 1 and names[0] != threading.current_thread().name  # the same model thread
        assert WhereAmI.loads == [(os.getpid(), names[0])]  # loaded once, in that thread
    finally:
        await backend.close()
    assert backend.capacity == 0


async def test_a_slow_batch_does_not_block_the_event_loop():
    backend = ThreadBackend(ModelSpec(WhereAmI))
    await backend.start()
    try:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.ensure_future(tick())
        await backend.run(["slow"])  # 0.3 s in the model thread
        ticker.cancel()
        assert ticks >= 10
    finally:
        await backend.close()


async def test_preload_loads_here_and_start_does_not_load_again():
    backend = ThreadBackend(ModelSpec(WhereAmI))
    backend.preload()  # as the gunicorn master does, before it forks
    assert WhereAmI.loads == [(os.getpid(), threading.current_thread().name)]
    await backend.start()
    try:
        assert len(WhereAmI.loads) == 1 and await backend.run(["x"])
    finally:
        await backend.close()


async def test_a_model_error_reaches_the_caller_and_the_backend_keeps_serving():
    backend = ThreadBackend(ModelSpec("tests.fakes:fragile"))
    await backend.start()
    try:
        with pytest.raises(RuntimeError, match="cannot handle boom"):
            await backend.run(["boom"])
        assert await backend.run(["fine"]) == ["FINE"] and backend.capacity == 1
    finally:
        await backend.close()


async def test_a_load_failure_fails_start():
    backend = ThreadBackend(ModelSpec("tests.process_fakes:BrokenLoad"))
    with pytest.raises(RuntimeError, match="no weights here"):
        await backend.start()
    assert backend.capacity == 0
    await backend.close()
