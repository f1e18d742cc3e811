"""Online before offline (docs/ARCHITECTURE.md, "Batching semantics"): work submitted inside
``batchserve.priority.offline()`` waits in its own lane.  Timing logic: fake models whose cost is known."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any

import pytest

from batchserve import Batcher, OverloadedError
from batchserve.backends.base import Backend
from batchserve.priority import is_offline, offline
from tests.fakes import RecordingModel


def test_the_mark_is_a_context_nested_and_reset():
    assert not is_offline()
    with offline():
        assert is_offline()
        with offline(False):
            assert not is_offline()
        assert is_offline()
    assert not is_offline()


async def test_an_online_request_goes_in_the_next_batch_not_behind_the_offline_backlog(make_batcher):
    model = RecordingModel(cost=0.05)
    batcher = make_batcher(model, max_batch_size=4, max_latency=0.01)
    with offline():  # the tasks made here carry the mark
        backlog = [asyncio.ensure_future(batcher.submit([i])) for i in range(48)]  # 13 batches: 0.65 s
    await asyncio.sleep(0.02)  # the first offline request went alone (an idle batcher does not wait); it runs
    assert batcher.offline_queue_depth == batcher.queue_depth == 47
    started = time.perf_counter()
    assert await batcher.submit([1000]) == [2000]
    waited = time.perf_counter() - started
    assert model.batches[1][0] == 1000  # the batch after the one running, first
    assert waited < 0.35, f"the online request waited {waited:.2f} s"  # about two batches, not thirteen
    assert [r[0] for r in await asyncio.gather(*backlog)] == [2 * i for i in range(48)]
    assert batcher.queue_depth == batcher.offline_queue_depth == 0
    assert sorted(model.seen) == [*range(48), 1000]


async def test_online_items_come_first_and_offline_ones_fill_the_rest_of_the_batch(make_batcher):
    model = RecordingModel(cost=0.15)
    batcher = make_batcher(model, max_batch_size=8)
    busy = asyncio.ensure_future(batcher.submit([-1]))
    await asyncio.sleep(0.05)
    with offline():
        queued_offline = asyncio.ensure_future(batcher.submit(list(range(100, 120))))  # one request, 20 items
    queued_online = [asyncio.ensure_future(batcher.submit([i])) for i in range(3)]
    await asyncio.sleep(0.02)
    assert (batcher.queue_depth, batcher.offline_queue_depth) == (23, 20)
    await asyncio.gather(busy, *queued_online, queued_offline)
    assert model.batches[1] == [0, 1, 2, 100, 101, 102, 103, 104]
    assert queued_offline.result() == [2 * i for i in range(100, 120)]  # in order across batches


async def test_offline_work_alone_is_batched_and_sent_as_online_work_is(make_batcher):
    """No online work: offline requests are not held back (max_latency still bounds the wait)."""
    model = RecordingModel(cost=0.02)
    batcher = make_batcher(model, max_batch_size=64, max_latency=0.05)
    with offline():
        await batcher.submit([0])  # the cost model has seen one batch
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        assert await batcher.submit([1]) == [2]  # a lone request on an idle batcher goes at once
        assert time.perf_counter() - started < 0.2
        started = time.perf_counter()
        results = await asyncio.gather(*(batcher.submit([i]) for i in range(10, 30)))
        assert time.perf_counter() - started < 0.05 + 0.02 * 2 + 0.2  # max_latency, two batches, slack
    assert results == [[2 * i] for i in range(10, 30)]
    assert max(len(batch) for batch in model.batches) > 1  # batched, not one by one


async def test_offline_items_never_make_the_queue_full_for_online_requests(make_batcher):
    model = RecordingModel(cost=0.15)
    batcher = make_batcher(model, max_batch_size=1, max_queue_size=4)
    busy = asyncio.ensure_future(batcher.submit(["busy"]))
    await asyncio.sleep(0.05)
    with offline():
        backlog = [asyncio.ensure_future(batcher.submit([i], timeout=0.25)) for i in range(4)]
        await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError, match=r"queue full \(4 items waiting\)"):
            await batcher.submit([99])  # offline: against both lanes
    online = [asyncio.ensure_future(batcher.submit([i])) for i in range(10, 14)]
    await asyncio.sleep(0.01)
    assert (batcher.queue_depth, batcher.offline_queue_depth) == (8, 4)
    with pytest.raises(OverloadedError, match=r"queue full \(4 items waiting\)"):
        await batcher.submit([99])  # online: against the online items only
    with offline(), pytest.raises(OverloadedError, match=r"queue full \(8 items waiting\)"):
        await batcher.submit([99])
    assert batcher.stats.errors["overloaded"] == 3
    # the offline items expire while the online ones run first: both counts stay right
    await asyncio.sleep(0.3)
    assert batcher.offline_queue_depth == 0 and 1 <= batcher.queue_depth <= 3
    outcomes = await asyncio.gather(busy, *online, *backlog, return_exceptions=True)
    assert [o[0] for o in outcomes[:5]] == ["busybusy", 20, 22, 24, 26]
    assert all(isinstance(o, Exception) for o in outcomes[5:])  # deadlines: online work filled every batch
    assert not set(range(4)) & set(model.seen)
    assert batcher.queue_depth == batcher.offline_queue_depth == 0


async def test_cancelled_offline_requests_leave_their_lane(make_batcher):
    model = RecordingModel(cost=0.2)
    batcher = make_batcher(model, max_batch_size=2)
    busy = asyncio.ensure_future(batcher.submit(["busy"]))
    await asyncio.sleep(0.05)
    with offline():
        dropped = asyncio.ensure_future(batcher.submit([1, 2, 3]))
        kept = asyncio.ensure_future(batcher.submit([4]))
    await asyncio.sleep(0.01)
    assert batcher.offline_queue_depth == 4
    dropped.cancel()
    await asyncio.sleep(0.01)
    assert (batcher.queue_depth, batcher.offline_queue_depth) == (1, 1)
    assert await kept == [8]
    await busy
    assert not {1, 2, 3} & set(model.seen)


async def test_closing_fails_what_waits_in_both_lanes(make_batcher):
    batcher = make_batcher(RecordingModel(cost=0.3), max_batch_size=1)
    busy = asyncio.ensure_future(batcher.submit([0]))
    await asyncio.sleep(0.05)
    online = asyncio.ensure_future(batcher.submit([1]))
    with offline():
        queued_offline = asyncio.ensure_future(batcher.submit([2]))
    await asyncio.sleep(0.01)
    await batcher.close()
    outcomes = await asyncio.gather(busy, online, queued_offline, return_exceptions=True)
    assert all(isinstance(o, Exception) and "shut down" in str(o) for o in outcomes[1:])
    assert batcher.queue_depth == batcher.offline_queue_depth == 0


def test_sync_callers_are_marked_in_their_own_thread(make_batcher):
    """submit_future/predict hop to the batcher's loop thread: the mark is the caller's, read before."""
    model = RecordingModel(cost=0.1)
    batcher = make_batcher(model, max_batch_size=2)
    with offline():  # the batcher's loop thread is started inside the mark: it must not leak to others
        first = batcher.submit_future([0])
        backlog = [batcher.submit_future([i]) for i in range(1, 12)]  # 7 batches
    time.sleep(0.05)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert pool.submit(batcher.predict, [500]).result(timeout=5) == [1000]
    assert [f.result(timeout=5)[0] for f in [first, *backlog]] == [2 * i for i in range(12)]
    ahead = next(n for n, batch in enumerate(model.batches) if 500 in batch)
    assert ahead <= 2 and model.batches[ahead][0] == 500  # the next batch (or the one after, on a slow machine)


class _Marks(Backend):
    """A one-slot backend that records whether each batch reached it as offline work."""

    def __init__(self) -> None:
        self.marks: list[tuple[list[Any], bool]] = []

    async def start(self) -> None:
        pass

    @property
    def capacity(self) -> int:
        return 1

    async def run(self, batch: list[Any]) -> list[Any]:
        self.marks.append((list(batch), is_offline()))
        await asyncio.sleep(0.05)
        return batch


async def test_the_backend_sees_a_batch_as_offline_only_when_all_its_items_are():
    backend = _Marks()
    async with Batcher(backend, max_batch_size=4) as batcher:
        with offline():  # the dispatcher starts inside the mark: each batch gets its own
            first = asyncio.ensure_future(batcher.submit(["a"]))
            await asyncio.sleep(0.01)
            rest = asyncio.ensure_future(batcher.submit(["b", "c"]))
        mixed = asyncio.ensure_future(batcher.submit(["online"]))
        await asyncio.gather(first, rest, mixed)
        await batcher.submit(["alone"])
    assert backend.marks == [(["a"], True), (["online", "b", "c"], False), (["alone"], False)]
