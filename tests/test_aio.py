"""SharedWork: identical work of concurrent callers done once.  LoopThread: a loop of its own
for sync callers, ended as asyncio.run ends its own."""

from __future__ import annotations

import asyncio

import pytest

from batchserve.aio import SharedWork


class Work:
    """A coroutine factory that counts its starts and finishes when told."""

    def __init__(self):
        self.starts = 0
        self.cancelled = 0
        self.release = asyncio.Event()

    async def __call__(self, value="done"):
        self.starts += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if isinstance(value, BaseException):
            raise value
        return value


async def settle() -> None:
    """Let every ready task run (a caller's task, then the work it starts)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_callers_with_one_key_share_one_run_and_its_outcome():
    shared, work = SharedWork(), Work()
    callers = [asyncio.ensure_future(shared.run("k", work)) for _ in range(5)]
    other = asyncio.ensure_future(shared.run("other", work))
    await settle()
    assert work.starts == 2 and len(shared) == 2
    work.release.set()
    assert await asyncio.gather(*callers, other) == ["done"] * 6
    assert len(shared) == 0
    assert await shared.run("k", work) == "done" and work.starts == 3  # finished work starts anew


async def test_a_key_of_none_shares_nothing():
    shared, work = SharedWork(), Work()
    work.release.set()
    await asyncio.gather(shared.run(None, work), shared.run(None, work))
    assert work.starts == 2


async def test_an_error_reaches_every_caller():
    shared, work = SharedWork(), Work()
    callers = [asyncio.ensure_future(shared.run("k", lambda: work(ValueError("bad")))) for _ in range(3)]
    await settle()
    work.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(result, ValueError) for result in results) and work.starts == 1


async def test_a_caller_leaving_leaves_the_work_to_the_others_and_the_last_one_cancels_it():
    shared, work = SharedWork(), Work()
    first, second = (asyncio.ensure_future(shared.run("k", work)) for _ in range(2))
    await settle()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await settle()
    assert work.cancelled == 0 and not second.done()
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    await settle()
    assert work.cancelled == 1 and len(shared) == 0


# --------------------------------------------------------------------------- LoopThread


def test_a_loop_thread_runs_coroutines_on_its_own_loop_and_thread():
    import threading

    from batchserve.aio import LoopThread

    async def where(value):
        await asyncio.sleep(0)
        return value, threading.current_thread().name, asyncio.get_running_loop()

    async def fail():
        raise ValueError("from the loop")

    loop_thread = LoopThread(name="batchserve-test")
    try:
        assert loop_thread.is_alive()
        value, thread_name, loop = loop_thread.run(where(7))
        assert (value, thread_name, loop) == (7, "batchserve-test", loop_thread.loop)
        assert loop_thread.submit(where(8)).result(timeout=5)[0] == 8
        with pytest.raises(ValueError, match="from the loop"):
            loop_thread.run(fail())
    finally:
        loop_thread.stop()
    assert not loop_thread.is_alive() and loop_thread.loop.is_closed()


def test_stopping_a_loop_thread_cancels_and_awaits_what_still_runs_there():
    from batchserve.aio import LoopThread

    ended: list[str] = []

    async def forever():
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)  # a cleanup that awaits still gets to run
            ended.append("task")

    async def numbers():
        try:
            yield 1
            yield 2
        finally:
            ended.append("generator")

    async def start_both():
        asyncio.get_running_loop().create_task(forever())
        generator = numbers()
        await generator.__anext__()  # suspended inside its try: closed at stop
        keep.append(generator)
        await asyncio.sleep(0.01)

    keep: list = []
    loop_thread = LoopThread()
    loop_thread.run(start_both())
    loop_thread.stop()
    assert sorted(ended) == ["generator", "task"]
    assert not loop_thread.is_alive() and loop_thread.loop.is_closed()
    loop_thread.stop()  # again: nothing to do
