"""ScoringQueue: the scoring of concurrent requests merged into shared engine calls.

About timing and merging only, so the engine is a fake whose calls finish when the test says;
what the runtime computes is tested in test_scoring.py and tests/runtimes/.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from batchserve.errors import DeadlineExceededError, NotReadyError
from batchserve.generation.scoring import ScoringQueue


class FakeLM:
    """Scores a text by its length; records what each call scored."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, text: str) -> list[int]:
        return [ord(char) for char in text]

    def score_passes(self, sequences, deadline=None):
        self.calls.append(["".join(map(chr, ids)) for ids in sequences])
        yield
        return [float(len(ids)) for ids in sequences]


class FakeEngine:
    """``call`` runs the job on a FakeLM once the test releases it (one call at a time)."""

    def __init__(self):
        self.lm = FakeLM()
        self.release = asyncio.Event()
        self.deadlines: list[float] = []
        self.fail: BaseException | None = None

    async def call(self, function, *args):
        await self.release.wait()
        self.release.clear()
        self.deadlines.append(args[-1])
        if self.fail is not None:
            raise self.fail
        job = function(self.lm, *args)  # a job, as the engine runs it: to its end
        while True:
            try:
                next(job)
            except StopIteration as done:
                return done.value


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.fixture
def engine():
    return FakeEngine()


def later(seconds: float = 60.0) -> float:
    return time.monotonic() + seconds


async def test_requests_waiting_during_a_call_are_scored_together_each_distinct_text_once(engine):
    queue = ScoringQueue(lambda: engine)
    first = asyncio.ensure_future(queue.text_logprobs(["a", "bb"], later()))
    await settle()  # the first call runs with the first request's texts
    waiting = [
        asyncio.ensure_future(queue.text_logprobs(texts, later()))
        for texts in (["ccc", "a b"], ["ccc", "dddd", "ccc"], ["e"])
    ]
    await settle()
    engine.release.set()
    assert await first == [1.0, 2.0]
    await settle()
    engine.release.set()
    assert await asyncio.gather(*waiting) == [[3.0, 3.0], [3.0, 4.0, 3.0], [1.0]]
    assert engine.lm.calls == [["a", "bb"], ["ccc", "a b", "dddd", "e"]]
    assert queue.calls == 2 and queue.texts == 6


async def test_a_request_whose_texts_the_running_call_scores_waits_for_that_call(engine):
    queue = ScoringQueue(lambda: engine)
    first = asyncio.ensure_future(queue.text_logprobs(["a", "bb"], later()))
    await settle()
    alike = asyncio.ensure_future(queue.text_logprobs(["bb", "a"], later()))
    overlapping = asyncio.ensure_future(queue.text_logprobs(["bb", "new"], later()))
    await settle()
    engine.release.set()
    assert await first == [1.0, 2.0] and await alike == [2.0, 1.0]
    await settle()
    engine.release.set()
    assert await overlapping == [2.0, 3.0]
    assert engine.lm.calls == [["a", "bb"], ["new"]]


async def test_a_call_takes_at_most_max_texts_oldest_first(engine):
    queue = ScoringQueue(lambda: engine, max_texts=3)
    requests = [asyncio.ensure_future(queue.text_logprobs([f"{index}-{n}" for n in range(2)], later())) for index in range(3)]
    for _ in range(3):
        await settle()
        engine.release.set()
    await asyncio.gather(*requests)
    assert [len(call) for call in engine.lm.calls] == [2, 3, 1]
    assert engine.lm.calls[1] == ["1-0", "1-1", "2-0"]


async def test_texts_nobody_waits_for_any_more_are_not_scored(engine):
    queue = ScoringQueue(lambda: engine)
    first = asyncio.ensure_future(queue.text_logprobs(["a"], later()))
    await settle()
    leaving = asyncio.ensure_future(queue.text_logprobs(["gone", "kept"], later()))
    staying = asyncio.ensure_future(queue.text_logprobs(["kept"], later()))
    await settle()
    leaving.cancel()
    await settle()
    engine.release.set()
    await first
    await settle()
    engine.release.set()
    assert await staying == [4.0]
    assert engine.lm.calls == [["a"], ["kept"]]


async def test_a_call_runs_to_the_latest_deadline_and_expired_texts_are_not_started(engine):
    queue = ScoringQueue(lambda: engine)
    first = asyncio.ensure_future(queue.text_logprobs(["a"], later(60)))
    await settle()
    soon, late = time.monotonic() + 0.05, later(120)
    expiring = asyncio.ensure_future(queue.text_logprobs(["x"], soon))
    patient = asyncio.ensure_future(queue.text_logprobs(["x", "y"], late))
    short = asyncio.ensure_future(queue.text_logprobs(["z"], soon))
    await asyncio.sleep(0.1)  # "z" expires while the first call runs; "x" is still wanted until `late`
    engine.release.set()
    await first
    await settle()
    with pytest.raises(DeadlineExceededError):
        await short
    engine.release.set()
    assert await patient == [1.0, 1.0] and await expiring == [1.0]
    assert engine.lm.calls == [["a"], ["x", "y"]] and engine.deadlines[1] == late


async def test_a_failed_call_fails_its_requests_and_the_queue_goes_on(engine):
    queue = ScoringQueue(lambda: engine)
    engine.fail = RuntimeError("decode failed")
    failing = asyncio.ensure_future(queue.text_logprobs(["a"], later()))
    await settle()
    engine.release.set()
    with pytest.raises(RuntimeError, match="decode failed"):
        await failing
    engine.fail = None
    engine.release.set()
    assert await queue.text_logprobs(["a"], later()) == [1.0]


async def test_an_engine_not_ready_reaches_the_request():
    def loading():
        raise NotReadyError("the generation model is loading")

    with pytest.raises(NotReadyError):
        await ScoringQueue(loading).text_logprobs(["a"], later())
