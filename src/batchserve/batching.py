"""Dynamic batching: the whole policy in one module.

A :class:`Batcher` merges the items of concurrent callers into mini-batches for a
:class:`~batchserve.backends.Backend`.  Its rules (docs/ARCHITECTURE.md, "Batching semantics"):

* **Idle-aware dispatch.** When the backend has a free slot and items are queued, a batch
  leaves at once, unless :class:`DispatchPolicy` predicts that waiting a little lowers the
  cost per item (a burst is still arriving and the model has a large fixed cost per call).
  It never waits longer than ``max_latency`` after the oldest queued request arrived, and
  a lone request on an idle server never waits at all.  While every slot is busy the
  queue simply grows, so the next batch is large.
* **Honest bounds.** A batch never holds more than ``max_batch_size`` items.
* **Token budgets.** A batch's cost is often its padded length times its rows, not its
  item count (a transformer pads every row to the longest).  Given a ``length`` function
  (item → tokens) and ``max_batch_tokens``, a dispatched batch runs as length-grouped
  passes: its items sorted by length, cut into passes whose rows × longest length stays
  within ``max_batch_tokens`` (an item longer than the budget runs alone).  Each pass is one
  call of the backend; outputs still come back in each request's order.
* **Multi-item requests** may span batches; their results come back in order.
* **Deadlines.** Every request has one (``timeout``, default per batcher).  A timer fails
  the caller at the deadline with :class:`~batchserve.errors.DeadlineExceededError`, and
  its queued items are dropped before compute.
* **Cancellation.** A cancelled caller's queued items are dropped.
* **Online before offline.** Work submitted inside :func:`batchserve.priority.offline` (a
  batch job's) waits in a lane of its own: a batch takes the online items first and fills
  its free rows with offline ones, oldest first.  With no online work queued, offline work
  is dispatched by the same rules as any (``max_latency`` included); while online work alone
  fills every batch, offline work waits (its deadline still holds).
* **Backpressure.** At most ``max_queue_size`` online items wait; past that, submit fails at
  once with :class:`~batchserve.errors.OverloadedError`.  Offline items are admitted only
  while the two lanes together hold fewer than ``max_queue_size``: they never make an online
  request find the queue full (so both lanes together hold at most twice that).
* **Error isolation.** If ``predict`` raises (or returns a wrong number of outputs), the
  batch is split in halves and retried until only the requests whose items fail get the
  error; the others get their results.
* **Worker death.** A batch whose worker died is retried once, then failed.

Three ways to call one batcher: ``await submit(items)``, ``submit_future(items)`` (a
``concurrent.futures.Future``) and ``predict(items)`` (blocking, from any thread).  The
batcher runs on one asyncio loop: the caller's, when started with ``await start()``, or
a private loop in a daemon thread otherwise (:class:`~batchserve.aio.LoopThread`, stopped
at interpreter exit if the caller did not stop it).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from batchserve.aio import LoopThread, wait_event
from batchserve.backends.base import Backend, batch_deadline
from batchserve.backends.registry import as_backend
from batchserve.errors import (
    DeadlineExceededError,
    InputError,
    ModelError,
    NotReadyError,
    OverloadedError,
    WorkerDiedError,
)
from batchserve.priority import is_offline, offline

if TYPE_CHECKING:  # the settings only travel through here: the library runs without them
    from batchserve.model import ModelSpec
    from batchserve.settings import Settings

log = logging.getLogger("batchserve.batching")

#: batchers running on a loop thread of their own: stopped at exit unless stopped before.
#: Held strongly: a batcher its caller dropped still runs there (its loop, tasks and model
#: live on), and a weak reference let the collector destroy its pending dispatcher task
#: ("Task was destroyed but it is pending!") with nothing left to stop it at exit.
_on_private_loops: set["Batcher"] = set()


@atexit.register
def _stop_private_loops() -> None:
    for batcher in list(_on_private_loops):
        try:
            batcher.stop()
        except Exception:  # the others must still be stopped
            log.exception("stopping batcher %r at exit failed", batcher.name)


# --------------------------------------------------------------------------- policy


class CostModel:
    """Predicts how long a batch of ``n`` items takes: ``fixed + per_item * n``.

    Fitted by least squares on the most recent batches the backend ran.
    """

    def __init__(self, window: int = 64):
        self.samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)

    def record(self, size: int, seconds: float) -> None:
        self.samples.append((size, seconds))

    def fit(self) -> tuple[float, float] | None:
        """Return ``(fixed, per_item)`` seconds, or None before any batch ran."""
        if not self.samples:
            return None
        count = len(self.samples)
        mean_size = sum(s for s, _ in self.samples) / count
        mean_time = sum(t for _, t in self.samples) / count
        spread = sum((s - mean_size) ** 2 for s, _ in self.samples)
        if spread == 0:
            # One batch size seen so far: the safest reading is that it is all fixed cost.
            return mean_time, 0.0
        per_item = sum((s - mean_size) * (t - mean_time) for s, t in self.samples) / spread
        per_item = max(per_item, 0.0)
        fixed = max(mean_time - per_item * mean_size, 0.0)
        return fixed, per_item


class DispatchPolicy:
    """Decides, when a slot is free, whether to send the queue now or wait for more items.

    Waiting ``w`` seconds is worth it only when it lowers the predicted cost per item::

        now:   (fixed + per_item * n) / n
        wait:  (w + fixed + per_item * (n + k)) / (n + k),   k = w / gap

    where ``gap`` is the recent time between arrivals.  The policy waits only while a
    burst is still arriving (the last arrival is recent compared with ``gap``), never
    before any batch was measured, and never past ``max_latency`` after the oldest
    queued request arrived.  So a lone request on an idle server goes out at once.
    """

    MARGIN = 0.9  # waiting must cut the cost per item by at least 10 %

    def __init__(self, max_batch_size: int, max_latency: float):
        self.max_batch_size = max_batch_size
        self.max_latency = max_latency
        self.costs = CostModel()
        self.gap = 1.0  # smoothed seconds between arrivals; starts "idle"
        self.last_arrival: float | None = None

    def record_arrival(self, now: float) -> None:
        if self.last_arrival is not None:
            self.gap = 0.8 * self.gap + 0.2 * min(now - self.last_arrival, 1.0)
        self.last_arrival = now

    def record_batch(self, size: int, seconds: float) -> None:
        self.costs.record(size, seconds)

    def wait_time(self, queued: int, oldest_arrival: float, now: float) -> float:
        """Seconds to wait before dispatching ``queued`` items; 0 means dispatch now."""
        budget = oldest_arrival + self.max_latency - now
        fit = self.costs.fit()
        if queued >= self.max_batch_size or budget <= 0 or fit is None:
            return 0.0
        if self.last_arrival is None or now - self.last_arrival > 2 * self.gap:
            return 0.0  # no burst under way: nobody else is coming soon
        fixed, per_item = fit
        cost_now = (fixed + per_item * queued) / queued
        time_to_fill = (self.max_batch_size - queued) * self.gap
        best_wait, best_cost = 0.0, cost_now * self.MARGIN
        for wait in (min(budget, time_to_fill), budget / 2, budget / 4):
            expected = min(self.max_batch_size, queued + wait / self.gap)
            cost = (wait + fixed + per_item * expected) / expected
            if cost < best_cost:
                best_wait, best_cost = wait, cost
        return best_wait


# --------------------------------------------------------------------------- requests


@dataclass(eq=False)
class _Request:
    items: list[Any]
    arrival: float
    future: asyncio.Future[list[Any]]
    results: list[Any] = field(init=False)
    taken: int = 0  # items already handed to batches
    missing: int = field(init=False)  # items still without a result
    timer: asyncio.TimerHandle | None = None
    lengths: list[int] | None = None  # tokens per item, with a token budget
    offline: bool = False  # in the offline lane (submitted inside priority.offline())

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.missing = len(self.items)

    @property
    def untaken(self) -> int:
        return len(self.items) - self.taken

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def deliver(self, index: int, output: Any) -> None:
        if self.future.done():
            return
        self.results[index] = output
        self.missing -= 1
        if self.missing == 0:
            self.future.set_result(self.results)


Batch = list[tuple[_Request, int]]  # (request, item index) pairs


@dataclass
class BatcherStats:
    """Counters the server turns into Prometheus metrics.

    A *batch* is what the batcher dispatched (counted once it ran, with its items that got a
    result); a *pass* is one call of the model.  They differ where a token budget runs a
    batch as several passes, and where an error splits a batch to isolate its bad items.
    """

    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)  # items per batch
    batches: int = 0
    items: int = 0
    pass_sizes: collections.Counter[int] = field(default_factory=collections.Counter)  # rows per model call that answered
    compute_seconds: float = 0.0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    # with a token budget: passes run, and tokens in them (real; padded = rows x longest)
    passes: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0


# --------------------------------------------------------------------------- batcher


class Batcher:
    """Merges concurrent callers' items into mini-batches for one model.

    ``model`` is anything :func:`batchserve.model.as_model` accepts (a function, a class
    with ``load``/``predict``, an instance, ``"module:attr"``), a :class:`ModelSpec`, or a
    ready :class:`Backend`; a model runs on a :class:`ThreadBackend`.

    ``length`` and ``max_batch_tokens`` turn on token budgets (see the module docstring):
    ``length(item)`` is called once per item, on the batcher's loop, when it is submitted.
    """

    def __init__(
        self,
        model: Any,
        *,
        max_batch_size: int = 32,
        max_latency: float = 0.01,
        max_queue_size: int = 1024,
        timeout: float = 30.0,
        name: str = "model",
        length: Callable[[Any], int] | None = None,
        max_batch_tokens: int | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_latency < 0:
            raise ValueError("max_latency must be >= 0")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if max_batch_tokens is not None and (length is None or max_batch_tokens < 1):
            raise ValueError("max_batch_tokens needs a length function and must be at least 1")
        self.backend: Backend = as_backend(model)
        self.length = length
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_latency = max_latency
        self.max_queue_size = max_queue_size
        self.timeout = timeout
        self.name = name
        self.policy = DispatchPolicy(max_batch_size, max_latency)
        self.stats = BatcherStats()
        self._queue: collections.deque[_Request] = collections.deque()  # online requests, oldest first
        self._offline_queue: collections.deque[_Request] = collections.deque()  # offline ones (priority.offline)
        self._queued_items = 0  # both lanes
        self._queued_offline = 0
        self._inflight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: LoopThread | None = None  # the private loop of sync callers
        self._start_lock = threading.Lock()
        self._started: concurrent.futures.Future[None] | None = None
        self._accepting = False
        self._changed: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._batch_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, spec: ModelSpec, settings: Settings, name: str) -> "Batcher":
        """A batcher for one model, on the backend and with the limits the settings name:
        what ``serve`` (each app) and ``batchserve worker`` build for every model.

        A model that declares ``batch_length`` runs in token-budgeted passes: of
        ``--max-batch-tokens``, else of its own ``max_batch_tokens``."""
        from batchserve.backends.registry import create_backend

        settings = settings.for_model(name)  # its own settings (a config file's apps: and models:) first
        batching = settings.batching
        length = spec.declared("batch_length")
        budget = (batching.max_batch_tokens or spec.declared("max_batch_tokens")) if length is not None else None
        return cls(
            create_backend(spec, settings, name),
            max_batch_size=batching.max_batch_size,
            max_latency=batching.max_latency,
            max_queue_size=batching.max_queue_size,
            timeout=batching.timeout,
            name=name,
            length=length if budget else None,
            max_batch_tokens=budget or None,
        )

    # ---------------------------------------------------------------- state

    @property
    def ready(self) -> bool:
        return self._accepting and self.backend.capacity > 0

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (online and offline)."""
        return self._queued_items

    @property
    def offline_queue_depth(self) -> int:
        """Of :attr:`queue_depth`, the offline items (submitted inside :func:`batchserve.priority.offline`)."""
        return self._queued_offline

    @property
    def inflight(self) -> int:
        """Batches running on the backend now."""
        return self._inflight

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load the model and start dispatching on the running loop (idempotent)."""
        loop = asyncio.get_running_loop()
        with self._start_lock:
            first = self._started is None
            if first:
                self._started = concurrent.futures.Future()
                self._loop = loop
        assert self._started is not None
        if not first:
            await asyncio.wrap_future(self._started)
            return
        try:
            self._changed = asyncio.Event()
            self.backend.on_capacity_change(self._wake_threadsafe)
            await self.backend.start()
            self._dispatcher = loop.create_task(self._dispatch_forever())
            self._accepting = True
        except BaseException as error:
            self._started.set_exception(error)
            raise
        self._started.set_result(None)

    def start_in_thread(self) -> None:
        """Start on a private event loop in a daemon thread (for sync callers)."""
        with self._start_lock:
            if self._started is not None:
                started = self._started
            else:
                started = None
                loop_thread = self._loop_thread = LoopThread(name=f"batchserve-{self.name}")
                _on_private_loops.add(self)
        if started is not None:
            started.result()
            return
        loop_thread.run(self.start())

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; wait up to ``grace`` s for queued and running work; stop."""
        if self._loop is None or self._loop.is_closed():
            return
        if asyncio.get_running_loop() is self._loop:
            await self._close_here(grace)
            return
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._close_here(grace), self._loop))
        await asyncio.to_thread(self._stop_own_thread)

    def stop(self, grace: float = 0.0) -> None:
        """Blocking :meth:`close`, from any thread but the batcher's own loop."""
        loop = self._loop
        own = self._loop_thread
        if loop is not None and not loop.is_closed() and (own is None or loop is not own.loop or own.is_alive()):
            asyncio.run_coroutine_threadsafe(self._close_here(grace), loop).result()
        self._stop_own_thread()

    async def _close_here(self, grace: float) -> None:
        self._accepting = False
        loop = asyncio.get_running_loop()  # the batcher's own
        deadline = loop.time() + grace
        while (self._queued_items or self._inflight) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for request in [*self._queue, *self._offline_queue]:
            request.fail(NotReadyError("batcher shut down before this request ran"))
            self._forget(request)  # now (its done callback runs later, and then finds nothing to count)
        self._queue.clear()
        self._offline_queue.clear()
        tasks = [task for task in (self._dispatcher, *self._batch_tasks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # let them end before the loop stops
        await self.backend.close()

    def _stop_own_thread(self) -> None:
        """End the private loop, if this batcher has one (:meth:`LoopThread.stop`)."""
        _on_private_loops.discard(self)
        if self._loop_thread is not None:
            self._loop_thread.stop()

    def __enter__(self) -> "Batcher":
        self.start_in_thread()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    async def __aenter__(self) -> "Batcher":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # ---------------------------------------------------------------- calling styles

    async def submit(self, items: Iterable[Any], timeout: float | None = None) -> list[Any]:
        """Await the outputs for ``items`` (in order).  Inside :func:`batchserve.priority.offline`
        they are offline work (each call style reads the mark in the caller's context)."""
        items = _item_list(items)
        if self._started is None or not self._started.done():
            await self.start()
        running = asyncio.get_running_loop()
        if running is self._loop:
            return await self._submit_here(items, timeout, is_offline())
        return await asyncio.wrap_future(self.submit_future(items, timeout))

    def submit_future(self, items: Iterable[Any], timeout: float | None = None) -> concurrent.futures.Future[list[Any]]:
        """Queue ``items`` from any thread; the future resolves to their outputs."""
        items = _item_list(items)  # here, in the caller's thread: a generator is read where it was made
        lane_offline = is_offline()  # the caller's mark, read before the hop to the batcher's loop
        if self._started is None:
            self.start_in_thread()
        elif not self._started.done() and _running_loop() is not self._loop:
            self._started.result()
        assert self._loop is not None
        if _running_loop() is self._loop:
            raise RuntimeError("on the batcher's own loop, use 'await batcher.submit(items)'")
        submitting = self._submit_here(items, timeout, lane_offline)
        try:
            return asyncio.run_coroutine_threadsafe(submitting, self._loop)
        except RuntimeError:  # stop() closed the loop
            submitting.close()
            raise NotReadyError(f"model {self.name!r} was stopped") from None

    def predict(self, items: Iterable[Any], timeout: float | None = None) -> list[Any]:
        """Block until the outputs for ``items`` are ready (thread-safe)."""
        future = self.submit_future(items, timeout)
        limit = (timeout if timeout is not None else self.timeout) + 5.0
        try:
            return future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceededError("no answer from the batcher's loop") from None

    # ---------------------------------------------------------------- queueing

    async def _submit_here(self, items: Iterable[Any], timeout: float | None, lane_offline: bool) -> list[Any]:
        items = list(items)
        if not items:
            return []
        timeout = self.timeout if timeout is None else timeout
        self._admit(len(items), timeout, lane_offline)
        lengths = self._measure(items) if self.max_batch_tokens is not None else None
        loop = asyncio.get_running_loop()
        now = loop.time()
        request = _Request(items, now, loop.create_future(), lengths=lengths, offline=lane_offline)
        request.timer = loop.call_at(now + timeout, self._expire, request, timeout)
        request.future.add_done_callback(lambda _: self._forget(request))
        (self._offline_queue if lane_offline else self._queue).append(request)
        self._queued_items += len(items)
        if lane_offline:
            self._queued_offline += len(items)
        self.policy.record_arrival(now)
        assert self._changed is not None
        self._changed.set()
        return await request.future  # cancelling the caller cancels this future

    def _admit(self, count: int, timeout: float, lane_offline: bool) -> None:
        """Refuse at once what cannot be accepted.  Online items count against the online items
        queued, offline items against both lanes: an offline backlog never fills the queue for
        online requests, and offline items only take room online ones leave free."""
        if not self._accepting:
            raise NotReadyError(f"model {self.name!r} is not ready")
        if timeout <= 0:
            raise DeadlineExceededError("deadline already passed")
        if count > self.max_queue_size:
            raise InputError(f"request has {count} items; the limit is {self.max_queue_size}")
        waiting = self._queued_items if lane_offline else self._queued_items - self._queued_offline
        if waiting + count > self.max_queue_size:
            self.stats.errors["overloaded"] += 1
            raise OverloadedError(f"queue full ({waiting} items waiting)", retry_after=self._retry_after(waiting))

    def _measure(self, items: list[Any]) -> list[int]:
        """Tokens of each item, from the ``length`` function; a failure is the caller's error."""
        assert self.length is not None
        try:
            lengths = [int(self.length(item)) for item in items]
        except Exception as error:
            raise InputError(f"cannot measure the length of an input: {type(error).__name__}: {error}") from None
        if any(length < 0 for length in lengths):
            raise InputError("the length function returned a negative length")
        return lengths

    def _retry_after(self, waiting: int) -> float:
        """Seconds until ``waiting`` queued items have likely drained."""
        fit = self.policy.costs.fit()
        if fit is None:
            return 1.0
        fixed, per_item = fit
        batches = math.ceil(waiting / self.max_batch_size)
        seconds = batches * (fixed + per_item * self.max_batch_size)
        return max(1.0, seconds / max(self.backend.capacity, 1))

    def _expire(self, request: _Request, timeout: float) -> None:
        self.stats.errors["deadline"] += 1
        request.fail(DeadlineExceededError(f"deadline of {timeout:g} s exceeded"))

    def _forget(self, request: _Request) -> None:
        """A finished, failed, expired or cancelled request leaves the queue."""
        if request.timer is not None:
            request.timer.cancel()
        self._queued_items -= request.untaken
        if request.offline:
            self._queued_offline -= request.untaken
        request.taken = len(request.items)

    # ---------------------------------------------------------------- dispatch

    async def _dispatch_forever(self) -> None:
        assert self._changed is not None and self._loop is not None
        while True:
            self._drop_finished_heads()
            heads = [lane[0] for lane in (self._queue, self._offline_queue) if lane]
            if not heads or self._inflight >= self.backend.capacity:
                self._changed.clear()
                await self._changed.wait()
                continue
            now = self._loop.time()
            # both lanes: offline items fill a batch too, and the oldest of either bounds the wait
            wait = self.policy.wait_time(self._queued_items, min(head.arrival for head in heads), now)
            if wait > 0:
                self._changed.clear()
                await wait_event(self._changed, wait)
                continue
            batch = self._take_batch()
            self._inflight += 1
            task = self._loop.create_task(self._run_batch(batch))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)

    def _drop_finished_heads(self) -> None:
        for lane in (self._queue, self._offline_queue):
            while lane and lane[0].untaken == 0:
                lane.popleft()

    def _take_batch(self) -> Batch:
        """Up to ``max_batch_size`` items: the online ones first, then offline ones, each lane oldest first."""
        batch: Batch = []
        for lane in (self._queue, self._offline_queue):
            while lane and len(batch) < self.max_batch_size:
                request = lane[0]
                count = min(request.untaken, self.max_batch_size - len(batch))
                batch.extend((request, index) for index in range(request.taken, request.taken + count))
                request.taken += count
                self._queued_items -= count
                if request.offline:
                    self._queued_offline -= count
                self._drop_finished_heads()
        return batch

    def _wake_threadsafe(self) -> None:
        if self._loop is not None and self._changed is not None:
            self._loop.call_soon_threadsafe(self._changed.set)

    # ---------------------------------------------------------------- compute

    async def _run_batch(self, batch: Batch) -> None:
        try:
            if self.max_batch_tokens is None:
                answered = await self._compute(batch, retried=False)
            else:
                answered = 0
                for piece in self._passes(batch):
                    answered += await self._compute(piece, retried=False)
            if answered:
                self.stats.batch_sizes[answered] += 1
                self.stats.batches += 1
                self.stats.items += answered
        except asyncio.CancelledError:
            for request, _ in batch:
                request.fail(NotReadyError("batcher shut down while this request ran"))
            raise
        except Exception as error:  # a bug here must still answer every caller
            log.exception("batch failed unexpectedly")
            for request, _ in batch:
                request.fail(ModelError(f"internal error: {error}"))
        finally:
            self._inflight -= 1
            assert self._changed is not None
            self._changed.set()

    def _passes(self, batch: Batch) -> list[Batch]:
        """The batch as length-grouped passes within the token budget (see :func:`length_passes`)."""
        assert self.max_batch_tokens is not None
        lengths = [(request.lengths or [])[index] for request, index in batch]  # each has lengths here
        groups = length_passes(lengths, self.max_batch_size, self.max_batch_tokens)
        passes = [[batch[position] for position in group] for group in groups]
        stats = self.stats
        stats.passes += len(passes)
        stats.real_tokens += sum(lengths)
        stats.padded_tokens += sum(len(group) * max(lengths[p] for p in group) for group in groups)
        return passes

    async def _compute(self, batch: Batch, retried: bool) -> int:
        """Run ``batch`` (its requests still waiting) on the backend; the items that got a result."""
        live = [(request, index) for request, index in batch if not request.future.done()]
        if not live:
            return 0
        inputs = [request.items[index] for request, index in live]
        batch_deadline.set(max(request.timer.when() for request, _ in live if request.timer is not None))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            # a batch of offline items only is offline work for the backend too (redis: its own stream)
            with offline(all(request.offline for request, _ in live)):
                outputs = _as_output_list(await self.backend.run(inputs), len(inputs))
        except (NotReadyError, OverloadedError, DeadlineExceededError) as error:
            # the backend refused or gave up on the whole batch: not the model's fault
            self.stats.errors[error.kind] += 1
            _fail_all(live, error)
            return 0
        except WorkerDiedError as error:
            self.stats.errors["worker_died"] += 1
            if retried:
                _fail_all(live, error)
                return 0
            log.warning("worker died under a batch of %d; retrying once", len(live))
            return await self._compute(live, retried=True)
        except Exception as error:
            return await self._isolate(live, error, retried)
        self._record_pass(len(live), loop.time() - started)
        for (request, index), output in zip(live, outputs):
            request.deliver(index, output)
        return len(live)

    async def _isolate(self, live: Batch, error: Exception, retried: bool) -> int:
        """Split a failing batch until only the requests whose items fail get the error."""
        requests = {id(request) for request, _ in live}
        if len(requests) == 1:
            self.stats.errors["model"] += 1
            _fail_all(live, _model_error(error))
            return 0
        middle = len(live) // 2
        return await self._compute(live[:middle], retried) + await self._compute(live[middle:], retried)

    def _record_pass(self, size: int, seconds: float) -> None:
        self.policy.record_batch(size, seconds)  # the cost model is of one call of the model
        self.stats.pass_sizes[size] += 1
        self.stats.compute_seconds += seconds


# --------------------------------------------------------------------------- helpers


def length_passes(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Positions of ``lengths`` grouped into passes: sorted by length, each pass at most
    ``max_rows`` rows and ``rows x longest <= max_tokens`` (a longer item goes alone).

    Sorting first makes each pass's rows similar in length, so padding (the tokens between a
    row's length and the pass's longest) stays small; filling each pass up to the budget
    keeps the passes few.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    passes: list[list[int]] = []
    current: list[int] = []
    for position in order:
        # ascending order: this item is the longest of the pass it joins
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * lengths[position] > max_tokens):
            passes.append(current)
            current = []
        current.append(position)
    if current:
        passes.append(current)
    return passes


def _item_list(items: Iterable[Any]) -> list[Any]:
    """``items`` as a list.  A ``str`` or ``bytes`` is refused: ``list("abc")`` would make
    three one-character inputs of what is surely one."""
    if isinstance(items, (str, bytes, bytearray)):
        raise TypeError(
            f"items must be a list of inputs, got a {type(items).__name__} (it would be split into "
            f"characters); for one input pass [text]"
        )
    try:
        return list(items)
    except TypeError:
        raise TypeError(f"items must be a list of inputs, got {type(items).__name__}") from None


def _as_output_list(outputs: Any, expected: int) -> list[Any]:
    try:
        listed: list[Any] = list(outputs)
    except TypeError:
        raise ModelError(f"predict returned {type(outputs).__name__}, expected a list") from None
    if len(listed) != expected:
        raise ModelError(f"predict returned {len(listed)} outputs for a batch of {expected} inputs")
    return listed


def _model_error(error: Exception) -> ModelError:
    """The caller's error for the model's exception; the original stays its ``__cause__`` (a
    traceback shows where the model failed)."""
    if isinstance(error, ModelError):
        return error
    wrapped = ModelError(f"{type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


def _fail_all(batch: Batch, error: BaseException) -> None:
    for request, _ in batch:
        request.fail(error)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
