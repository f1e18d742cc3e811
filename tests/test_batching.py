"""The batching contract (docs/ARCHITECTURE.md, "Batching semantics"), on fake models whose cost is known."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from batchserve import DeadlineExceededError, InputError, ModelError, OverloadedError
from batchserve.batching import CostModel, DispatchPolicy
from tests.fakes import RecordingModel, wrong_count


async def test_lone_request_on_idle_server_pays_no_batching_wait(make_batcher):
    model = RecordingModel(cost=0.02)
    batcher = make_batcher(model, max_batch_size=64, max_latency=1.0)
    await batcher.submit([1])  # warm-up: the cost model has seen one batch
    await asyncio.sleep(0.3)  # idle again
    started = time.perf_counter()
    assert await batcher.submit([21]) == [42]
    assert time.perf_counter() - started < 0.5


async def test_200_concurrent_callers_share_bounded_batches(make_batcher):
    model = RecordingModel(cost=0.02)
    batcher = make_batcher(model, max_batch_size=16, max_latency=0.05)
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(200)))
    assert results == [[2 * i] for i in range(200)]
    sizes = [len(batch) for batch in model.batches]
    assert max(sizes) <= 16
    assert max(sizes) > 1
    assert sorted(model.seen) == list(range(200))


async def test_poison_item_fails_only_its_request(make_batcher):
    model = RecordingModel(cost=0.005)
    batcher = make_batcher(model, max_batch_size=64)
    inputs = ["poison" if i == 17 else i for i in range(64)]
    outcomes = await asyncio.gather(*(batcher.submit([x]) for x in inputs), return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(errors) == 1 and outcomes[17] is errors[0]
    assert isinstance(errors[0], ModelError) and "poison item cannot be doubled" in str(errors[0])
    assert [o for i, o in enumerate(outcomes) if i != 17] == [[2 * i] for i in range(64) if i != 17]
    assert await batcher.submit([5]) == [10]


async def test_multi_item_requests_span_batches_in_order(make_batcher):
    model = RecordingModel(cost=0.001)
    batcher = make_batcher(model, max_batch_size=4)
    first, second = await asyncio.gather(batcher.submit(list(range(10))), batcher.submit([100, 101, 102]))
    assert first == [2 * i for i in range(10)]
    assert second == [200, 202, 204]
    assert max(len(batch) for batch in model.batches) <= 4


async def test_expired_requests_are_never_computed(make_batcher):
    model = RecordingModel(cost=0.3)
    batcher = make_batcher(model, max_batch_size=1)
    busy = asyncio.ensure_future(batcher.submit(["busy"]))
    await asyncio.sleep(0.05)  # the model is now busy for 0.3 s
    started = time.perf_counter()
    with pytest.raises(DeadlineExceededError):
        await batcher.submit(["expired"], timeout=0.1)
    assert time.perf_counter() - started < 0.25  # the caller never waits past its deadline
    await busy
    await batcher.submit(["after"])
    assert "expired" not in model.seen


async def test_cancelled_requests_are_never_computed(make_batcher):
    model = RecordingModel(cost=0.3)
    batcher = make_batcher(model, max_batch_size=1)
    busy = asyncio.ensure_future(batcher.submit(["busy"]))
    await asyncio.sleep(0.05)
    cancelled = asyncio.ensure_future(batcher.submit(["cancelled"]))
    await asyncio.sleep(0.05)
    assert batcher.queue_depth == 1
    cancelled.cancel()
    await asyncio.sleep(0)
    assert batcher.queue_depth == 0
    await busy
    await batcher.submit(["after"])
    assert "cancelled" not in model.seen


async def test_deadline_passes_while_batch_runs(make_batcher):
    batcher = make_batcher(RecordingModel(cost=0.5))
    started = time.perf_counter()
    with pytest.raises(DeadlineExceededError):
        await batcher.submit([1], timeout=0.1)
    assert time.perf_counter() - started < 0.4


async def test_full_queue_fails_fast(make_batcher):
    batcher = make_batcher(RecordingModel(cost=0.3), max_batch_size=1, max_queue_size=3)
    running = [asyncio.ensure_future(batcher.submit([i])) for i in range(4)]  # 1 running + 3 queued
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    with pytest.raises(OverloadedError) as refused:
        await batcher.submit([99])
    assert time.perf_counter() - started < 0.05
    assert refused.value.retry_after >= 1
    with pytest.raises(InputError):
        await batcher.submit(list(range(4)))  # can never fit
    assert [r[0] for r in await asyncio.gather(*running)] == [0, 2, 4, 6]


async def test_wrong_number_of_outputs_is_a_clear_error(make_batcher):
    batcher = make_batcher(wrong_count)
    with pytest.raises(ModelError, match="returned 0 outputs for a batch of 1 inputs"):
        await batcher.submit([1])


def test_the_models_own_exception_is_the_errors_cause(make_batcher):
    def predict(items):
        raise KeyError(items[0])

    batcher = make_batcher(predict)
    with pytest.raises(ModelError, match="KeyError: 'x'") as raised:
        batcher.predict(["x"])
    assert isinstance(raised.value.__cause__, KeyError)  # the traceback reaches the model's line


def test_a_str_given_as_items_is_refused_not_split_into_characters(make_batcher):
    batcher = make_batcher(lambda items: [2 * x for x in items])
    with pytest.raises(TypeError, match=r"items must be a list of inputs, got a str .* pass \[text\]"):
        batcher.predict("abc")  # was ['aa', 'bb', 'cc']
    with pytest.raises(TypeError, match="got a bytes"):
        batcher.submit_future(b"abc")
    with pytest.raises(TypeError, match="items must be a list of inputs, got int"):
        batcher.predict(3)
    assert batcher.predict(["abc"]) == ["abcabc"]
    assert batcher.predict(x for x in (1, 2)) == [2, 4]  # any other iterable still works


async def test_an_awaited_str_is_refused_too(make_batcher):
    batcher = make_batcher(lambda items: items)
    with pytest.raises(TypeError, match="got a str"):
        await batcher.submit("abc")


def test_three_calling_styles_on_one_object(make_batcher):
    batcher = make_batcher(RecordingModel(cost=0.01), max_batch_size=8)
    assert batcher.predict([1, 2]) == [2, 4]
    futures = [batcher.submit_future([i]) for i in range(20)]
    assert [f.result(timeout=10) for f in futures] == [[2 * i] for i in range(20)]

    async def from_another_loop():
        return await batcher.submit([7])

    assert asyncio.run(from_another_loop()) == [14]


def test_predict_is_thread_safe(make_batcher):
    model = RecordingModel(cost=0.01)
    batcher = make_batcher(model, max_batch_size=8)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: batcher.predict([i, i + 1]), range(64)))
    assert results == [[2 * i, 2 * i + 2] for i in range(64)]
    assert max(len(batch) for batch in model.batches) <= 8


def test_submit_future_cancel_drops_queued_items(make_batcher):
    model = RecordingModel(cost=0.3)
    batcher = make_batcher(model, max_batch_size=1)
    busy = batcher.submit_future(["busy"])
    time.sleep(0.05)
    queued = batcher.submit_future(["dropped"])
    time.sleep(0.05)
    queued.cancel()
    busy.result(timeout=5)
    batcher.predict(["after"])
    assert "dropped" not in model.seen


def test_model_class_with_load_is_loaded_once_in_its_thread(make_batcher):
    class Loaded:
        loads: list[str] = []

        def load(self):
            self.loads.append(threading.current_thread().name)

        def predict(self, batch):
            return [threading.current_thread().name for _ in batch]

    batcher = make_batcher(Loaded)
    names = batcher.predict([1, 2, 3])
    assert len(Loaded.loads) == 1 and names == [Loaded.loads[0]] * 3
    assert Loaded.loads[0] != threading.current_thread().name


def test_policy_never_waits_past_max_latency():
    policy = DispatchPolicy(max_batch_size=64, max_latency=0.05)
    policy.record_batch(1, 0.05)  # a large fixed cost makes waiting attractive
    now = 100.0
    for step in range(50):  # a burst: one arrival every millisecond
        policy.record_arrival(now + step * 0.001)
    now += 0.049
    wait = policy.wait_time(queued=2, oldest_arrival=100.04, now=now)
    assert 0 < wait <= 100.04 + 0.05 - now
    assert policy.wait_time(queued=2, oldest_arrival=100.0, now=now) <= 0.001
    assert policy.wait_time(queued=2, oldest_arrival=99.0, now=now) == 0
    assert policy.wait_time(queued=64, oldest_arrival=100.04, now=now) == 0


def test_policy_dispatches_at_once_when_no_burst_is_arriving():
    policy = DispatchPolicy(max_batch_size=64, max_latency=1.0)
    policy.record_batch(1, 0.05)
    policy.record_arrival(10.0)
    assert policy.wait_time(queued=1, oldest_arrival=10.0, now=10.0) == 0  # idle before
    policy.record_arrival(10.5)
    assert policy.wait_time(queued=1, oldest_arrival=12.0, now=12.0) == 0  # quiet for 1.5 s


def test_cost_model_separates_fixed_and_per_item_cost():
    costs = CostModel()
    for size in (1, 8, 16, 32):
        costs.record(size, 0.01 + 0.001 * size)
    fixed, per_item = costs.fit()
    assert fixed == pytest.approx(0.01, abs=1e-6) and per_item == pytest.approx(0.001, abs=1e-6)


def test_a_sync_batcher_left_running_is_stopped_quietly_at_exit():
    import subprocess
    import sys

    script = "from batchserve import Batcher\nprint(Batcher(lambda xs: [x * 2 for x in xs]).predict([1, 2]))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "[2, 4]\n")
    assert "destroyed but it is pending" not in done.stderr and "Traceback" not in done.stderr, done.stderr
