"""``@batchserve.batch``: one item per call, batched behind the scenes with the Batcher's rules,
used as a service would use it (many threads, an event loop, methods of several instances)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import math
import threading
import time
import weakref

import pytest

import batchserve
from batchserve import Batcher, DeadlineExceededError, ModelError, NotReadyError, batch
from tests import quiet_exit


@pytest.fixture
def stopping():
    """``stopping(f)`` returns ``f`` and stops it after the test (a thread left running would
    outlive the test)."""
    made = []

    def keep(batched):
        made.append(batched)
        return batched

    yield keep
    for batched in made:
        batched.stop()


class Recorder:
    """A batch function that doubles numbers, keeps the batches it saw, and takes ``cost`` s."""

    def __init__(self, cost: float = 0.0):
        self.cost = cost
        self.batches: list[list] = []
        self.lock = threading.Lock()

    def __call__(self, items: list) -> list:
        with self.lock:
            self.batches.append(list(items))
        time.sleep(self.cost)
        if "poison" in items:
            raise ValueError("poison cannot be doubled")
        return [2 * x for x in items]


# --------------------------------------------------------------------------- service-like use


def test_sixteen_threads_get_their_own_results_in_shared_bounded_batches(stopping):
    recorder = Recorder(cost=0.02)

    @stopping
    @batch(max_batch_size=8, max_latency=0.01)
    def double(items: list[int]) -> list[int]:
        return recorder(items)

    def client(first: int) -> list[int]:
        return [double(first + step) for step in range(10)]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(0, 1600, 100)))
    assert results == [[2 * (first + step) for step in range(10)] for first in range(0, 1600, 100)]
    sizes = [len(items) for items in recorder.batches]
    assert sum(sizes) == 160 and max(sizes) <= 8
    assert max(sizes) > 1  # callers shared batches
    assert double.batcher.stats.items == 160 and double.batcher.stats.batches == len(sizes)


def test_a_lone_call_on_an_idle_function_does_not_wait(stopping):
    @stopping
    @batch(max_batch_size=64, max_latency=1.0)
    def echo(items: list[int]) -> list[int]:
        return items

    assert echo(1) == 1  # the first call starts the batcher
    time.sleep(0.2)
    started = time.perf_counter()
    assert echo(2) == 2
    assert time.perf_counter() - started < 0.3  # far below max_latency


async def test_gathered_calls_are_batched_on_the_callers_loop():
    loops = []
    batches = []

    @batch(max_batch_size=16)
    async def double(items: list[int]) -> list[int]:
        loops.append(asyncio.get_running_loop())
        batches.append(len(items))
        await asyncio.sleep(0.01)
        return [2 * x for x in items]

    threads_before = set(threading.enumerate())
    try:
        results = await asyncio.gather(*(double(i) for i in range(100)))
        assert results == [2 * i for i in range(100)]
        assert max(batches) <= 16 and max(batches) > 1 and sum(batches) == 100
        assert set(loops) == {asyncio.get_running_loop()}  # no thread, no loop of its own
        assert set(threading.enumerate()) <= threads_before
        assert double.batcher.stats.items == 100
    finally:
        await double.close()


def test_an_async_function_gets_a_fresh_batcher_on_each_new_loop():
    @batch
    async def echo(items: list[int]) -> list[int]:
        return items

    async def call(item: int) -> tuple[int, Batcher]:
        return await echo(item), echo.batcher

    first, first_batcher = asyncio.run(call(1))
    second, second_batcher = asyncio.run(call(2))  # the first loop is closed by now
    assert (first, second) == (1, 2)
    assert first_batcher is not second_batcher


# --------------------------------------------------------------------------- methods


class Scaler:
    def __init__(self, factor: int):
        self.factor = factor
        self.batches: list[list[int]] = []

    @batch(max_batch_size=4)
    def predict(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        time.sleep(0.01)
        return [self.factor * x for x in items]

    @batch(max_batch_size=4)
    async def apredict(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(0.01)
        return [self.factor * x for x in items]


def test_each_instance_has_its_own_batcher_and_sees_only_its_items():
    twice, thrice = Scaler(2), Scaler(3)
    try:
        assert twice.predict.batcher is twice.predict.batcher
        assert twice.predict.batcher is not thrice.predict.batcher

        def client(i: int) -> tuple[int, int]:
            return twice.predict(i), thrice.predict(1000 + i)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(client, range(40)))
        assert results == [(2 * i, 3 * (1000 + i)) for i in range(40)]
        assert sorted(x for b in twice.batches for x in b) == list(range(40))
        assert sorted(x for b in thrice.batches for x in b) == list(range(1000, 1040))
        assert max(len(b) for b in twice.batches + thrice.batches) <= 4
    finally:
        twice.predict.stop()
        thrice.predict.stop()


async def test_async_methods_batch_per_instance():
    twice, thrice = Scaler(2), Scaler(3)
    try:
        results = await asyncio.gather(*(twice.apredict(i) for i in range(20)), *(thrice.apredict(i) for i in range(20)))
        assert results == [2 * i for i in range(20)] + [3 * i for i in range(20)]
        assert sorted(x for b in twice.batches for x in b) == list(range(20))
        assert sorted(x for b in thrice.batches for x in b) == list(range(20))
        assert twice.apredict.batcher is not thrice.apredict.batcher
    finally:
        await twice.apredict.close()
        await thrice.apredict.close()


def test_a_freed_instance_takes_its_batcher_and_thread_with_it():
    scaler = Scaler(2)
    assert scaler.predict(5) == 10
    batcher = scaler.predict.batcher
    thread = batcher._loop_thread.thread
    assert thread is not None and thread.is_alive()
    freed = weakref.ref(scaler)
    del scaler
    gc.collect()
    assert freed() is None  # the running batcher did not keep its instance alive
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert not batcher.ready


def test_a_bound_method_keeps_its_instance_alive():
    method = Scaler(2).predict
    try:
        gc.collect()
        assert method(4) == 8
    finally:
        method.stop()


def test_a_batched_method_called_on_the_class_says_how_to_call_it():
    with pytest.raises(TypeError, match=r"call it on an instance, obj.predict\(item\)"):
        Scaler.predict([1])
    with pytest.raises(AttributeError, match="each instance has its own batcher"):
        Scaler.predict.batcher  # noqa: B018


# --------------------------------------------------------------------------- the Batcher's rules


def test_a_bad_item_fails_only_its_caller(stopping):
    recorder = Recorder()
    gate = threading.Event()

    @stopping
    @batch(max_batch_size=16, max_latency=0.01)
    def double(items: list) -> list:
        gate.wait(10)
        return recorder(items)

    with concurrent.futures.ThreadPoolExecutor(17) as pool:
        blocker = pool.submit(double, -1)  # holds the model while the others queue
        while not recorder.batches and double.batcher.inflight == 0:
            time.sleep(0.005)
        items = ["poison" if i == 5 else i for i in range(16)]
        futures = [pool.submit(double, item) for item in items]
        deadline = time.monotonic() + 10
        while double.batcher.queue_depth < 16 and time.monotonic() < deadline:
            time.sleep(0.005)
        gate.set()
        assert blocker.result(timeout=10) == -2
        outcomes = [f.exception(timeout=10) or f.result() for f in futures]
    error = outcomes[5]
    assert isinstance(error, ModelError) and "poison cannot be doubled" in str(error)
    assert isinstance(error.__cause__, ValueError)  # the function's own exception, with its traceback
    assert [o for i, o in enumerate(outcomes) if i != 5] == [2 * i for i in range(16) if i != 5]
    assert any("poison" in b and len(b) > 1 for b in recorder.batches)  # it shared a batch
    assert double(7) == 14


async def test_an_async_bad_item_fails_only_its_caller():
    @batch
    async def double(items: list) -> list:
        if "poison" in items:
            raise ValueError("poison cannot be doubled")
        return [2 * x for x in items]

    try:
        outcomes = await asyncio.gather(*(double(x) for x in [1, "poison", 3]), return_exceptions=True)
        assert outcomes[0] == 2 and outcomes[2] == 6
        assert isinstance(outcomes[1], ModelError) and isinstance(outcomes[1].__cause__, ValueError)
    finally:
        await double.close()


def test_a_wrong_number_of_results_is_an_error_that_names_the_function(stopping):
    @stopping
    @batch
    def drops_one(items: list[int]) -> list[int]:
        return items[1:]

    @stopping
    @batch
    def not_a_list(items: list[int]) -> int:
        return len(items)

    with pytest.raises(ModelError, match=r"drops_one returned 0 results for 1 items; .* one result per item"):
        drops_one(1)
    with pytest.raises(ModelError, match=r"not_a_list returned int; a @batch function returns a list"):
        not_a_list(1)


def test_a_call_past_its_deadline_fails_in_time(stopping):
    @stopping
    @batch(timeout=0.1)
    def slow(items: list[int]) -> list[int]:
        time.sleep(0.5)
        return items

    started = time.perf_counter()
    with pytest.raises(DeadlineExceededError):
        slow(1)
    assert time.perf_counter() - started < 0.4
    with pytest.raises(DeadlineExceededError):
        slow(2, timeout=0.05)  # a call's own deadline


async def test_an_async_call_past_its_deadline_fails_in_time():
    @batch
    async def slow(items: list[int]) -> list[int]:
        await asyncio.sleep(0.5)
        return items

    try:
        started = time.perf_counter()
        with pytest.raises(DeadlineExceededError):
            await slow(1, timeout=0.1)
        assert time.perf_counter() - started < 0.4
    finally:
        await slow.close()


def test_a_stopped_function_refuses_calls_and_leaves_no_thread():
    @batch
    def echo(items: list[int]) -> list[int]:
        return items

    assert echo(1) == 1
    thread = echo.batcher._loop_thread.thread
    echo.stop()
    assert not thread.is_alive()
    with pytest.raises(NotReadyError, match="echo was stopped"):
        echo(2)

    @batch
    def never_called(items: list[int]) -> list[int]:
        return items

    never_called.stop()
    with pytest.raises(NotReadyError):
        never_called(1)  # a batcher stopped before its first call does not start afterwards


# --------------------------------------------------------------------------- checked when decorating


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be at least 1, got 0"),
        ({"max_batch_size": "8"}, TypeError, "max_batch_size must be an int, got str"),
        ({"max_batch_size": 8.0}, TypeError, "max_batch_size must be an int, got float"),
        ({"max_batch_size": True}, TypeError, "max_batch_size must be an int, got bool"),
        ({"max_latency": -0.01}, ValueError, "max_latency must be a finite number of seconds >= 0"),
        ({"max_latency": "fast"}, TypeError, "max_latency must be a number of seconds"),
        ({"timeout": 0}, ValueError, "timeout must be a finite number of seconds > 0"),
        ({"timeout": math.inf}, ValueError, "timeout must be a finite number of seconds > 0"),
        ({"max_queue_size": 0}, ValueError, "max_queue_size must be at least 1"),
        ({"max_batch_tokens": 512}, ValueError, "max_batch_tokens needs length="),
        ({"length": 5, "max_batch_tokens": 512}, TypeError, "length must be a function"),
    ],
)
def test_bad_options_fail_when_decorating(options, error, message):
    with pytest.raises(error, match=message):
        batch(**options)


def test_what_cannot_be_batched_fails_when_decorating():
    with pytest.raises(TypeError, match=r"give options by keyword: @batch\(max_batch_size=...\)"):
        batch(8)
    with pytest.raises(TypeError, match="decorates a function or method, got str"):
        batch("predict")
    with pytest.raises(TypeError, match="not a class"):
        batch(Scaler)
    with pytest.raises(TypeError, match=r"must take one argument, the list of items: def nothing\(items\)"):

        @batch
        def nothing() -> list:
            return []

    with pytest.raises(TypeError, match=r"must take one argument"):

        @batch
        def two(items: list, extra: int) -> list:
            return items

    with pytest.raises(TypeError, match="is a generator"):

        @batch
        def generate(items: list):
            yield from items

    with pytest.raises(TypeError, match="@batch goes below @staticmethod"):
        batch(staticmethod(lambda items: items))


def test_a_method_missing_its_items_fails_when_its_class_is_defined():
    with pytest.raises(TypeError, match=r"must take one argument, the list of items: def predict\(self, items\)"):

        class Broken:
            @batch
            def predict(self) -> list:
                return []


def test_optional_arguments_and_staticmethods_are_functions(stopping):
    class Holder:
        @staticmethod
        @batch
        def echo(items: list[int], scale: int = 1) -> list[int]:
            return [scale * x for x in items]

    stopping(Holder.echo)
    assert Holder.echo(3) == 3 and Holder().echo(4) == 4


def test_the_decorator_is_exported_and_keeps_the_functions_name(stopping):
    @stopping
    @batchserve.batch
    def embed(items: list[str]) -> list[int]:
        """Lengths."""
        return [len(s) for s in items]

    assert embed.__name__ == "embed" and embed.__doc__ == "Lengths."
    assert embed.batcher.name.endswith("embed") and embed.batcher.max_batch_size == 32


# --------------------------------------------------------------------------- a str is one item


def test_a_str_is_one_item(stopping):
    @stopping
    @batch
    def double(items: list[str]) -> list[str]:
        return [2 * x for x in items]

    assert double("abc") == "abcabc"  # never split into characters


# --------------------------------------------------------------------------- exit


EXIT_SCRIPT = """
    import asyncio, concurrent.futures, warnings
    import batchserve

    # the loop this script leaves unclosed at the end is its own fault, not batchserve's
    warnings.filterwarnings("ignore", "unclosed event loop", ResourceWarning)

    @batchserve.batch(max_batch_size=8)
    def double(items):
        return [2 * x for x in items]

    @batchserve.batch
    async def triple(items):
        await asyncio.sleep(0.001)
        return [3 * x for x in items]

    class Model:
        @batchserve.batch
        def predict(self, items):
            return [-x for x in items]

    kept = Model()  # alive until exit

    def made_and_forgotten():
        model = Model()
        return model.predict(1)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(double, range(32))) == [2 * i for i in range(32)]
    assert kept.predict(2) == -2 and made_and_forgotten() == -1

    async def main():
        return await asyncio.gather(*(triple(i) for i in range(10)))

    assert asyncio.run(main()) == [3 * i for i in range(10)]
    loop = asyncio.new_event_loop()  # a loop closed with the batcher's task still pending
    assert loop.run_until_complete(triple(5)) == 15
    loop.close()
    leftover = asyncio.new_event_loop()  # and one left running nothing, never closed
    assert leftover.run_until_complete(triple(6)) == 18
    leftover.run_until_complete(asyncio.sleep(0))
    print("ok", flush=True)
"""


def test_a_script_exits_promptly_and_quietly_with_batchers_running():
    started = time.monotonic()
    done = quiet_exit.run_script(EXIT_SCRIPT, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
    quiet_exit.assert_quiet(done)
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------- types


TYPED_USE = """
import batchserve

@batchserve.batch
def lengths(items: list[str]) -> list[int]:
    return [len(s) for s in items]

@batchserve.batch(max_batch_size=8)
async def shout(items: list[str]) -> list[str]:
    return [s.upper() for s in items]

class Model:
    @batchserve.batch(max_batch_size=4)
    def predict(self, items: list[int]) -> list[float]:
        return [x / 2 for x in items]

async def main() -> None:
    reveal_type(lengths("abc"))
    reveal_type(await shout("a"))
    reveal_type(Model().predict(3))
    reveal_type(Model().predict.batcher)
    lengths(3)
"""


def test_mypy_infers_one_item_in_one_result_out(tmp_path):
    from mypy import api  # in the test extra: make lint runs it over the core
    (tmp_path / "typed_use.py").write_text(TYPED_USE)
    options = ["--strict", "--follow-imports=silent", "--no-incremental", "--cache-dir", str(tmp_path / "cache")]
    stdout, _, _ = api.run([*options, str(tmp_path / "typed_use.py")])
    revealed = [
        line.split('Revealed type is "')[1].rstrip('"').removeprefix("builtins.")
        for line in stdout.splitlines()
        if "Revealed type" in line
    ]
    assert revealed == ["int", "str", "float", "batchserve.batching.Batcher"], stdout
    assert 'Argument 1 to "__call__" of "Batched" has incompatible type "int"; expected "str"' in stdout
    assert stdout.count("error:") == 1, stdout
