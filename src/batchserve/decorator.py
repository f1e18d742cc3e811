"""``@batch``: a function of a list, called one item at a time, batched behind the scenes.

Decorate a function that takes a list of items and returns one result per item::

    @batchserve.batch(max_batch_size=32, max_latency=0.01)
    def embed(texts: list[str]) -> list[list[float]]:
        return model.encode(texts)

    vector = embed("hello")         # one item in, its result out, from any thread

Concurrent callers' items are merged into batches by a :class:`~batchserve.batching.Batcher`,
so the decorated function has the batcher's semantics and none of its own: no wait on an idle
server, a deadline per call (:class:`~batchserve.errors.DeadlineExceededError`), a bad item
failing only its caller (:class:`~batchserve.errors.ModelError`, the function's exception as
its ``__cause__``), a bounded queue (:class:`~batchserve.errors.OverloadedError`).

* A plain function runs on the batcher's private loop thread and a model thread; a call blocks
  (from a coroutine, ``await f.batcher.submit([item])`` waits without blocking the loop).
* An ``async def`` runs on the caller's event loop (one batcher per loop); a call is awaited.
* A method gets one batcher per instance, stopped when the instance is freed.

``f.batcher`` (or ``obj.method.batcher``) is the :class:`Batcher`, for its ``stats``;
``f.stop()`` (``await f.close()`` on an event loop) shuts it down.  Batchers still running
at interpreter exit are stopped then.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import logging
import math
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar, overload

from batchserve.backends.base import Backend
from batchserve.batching import Batcher
from batchserve.errors import BatchserveError, ModelError, NotReadyError

__all__ = ["AsyncBatched", "AsyncBatchedMethod", "Batched", "BatchedMethod", "batch"]

log = logging.getLogger("batchserve.decorator")

X = TypeVar("X")  # one input item
Y = TypeVar("Y")  # one result
S = TypeVar("S")  # the instance a method is bound to

#: batchers running on a caller's loop, until closed (also so that their dispatch task is
#: never garbage-collected while pending: asyncio keeps only weak references to tasks)
_on_caller_loops: set[Batcher] = set()
_closing: set[asyncio.Task[None]] = set()


# --------------------------------------------------------------------------- options


class _Options:
    """The decorator's arguments, checked once, at decoration time."""

    def __init__(
        self,
        max_batch_size: Any,
        max_latency: Any,
        timeout: Any,
        max_queue_size: Any,
        length: Any,
        max_batch_tokens: Any,
        name: Any,
    ):
        self.max_batch_size = _positive_int("max_batch_size", max_batch_size)
        self.max_queue_size = _positive_int("max_queue_size", max_queue_size)
        self.max_latency = _seconds("max_latency", max_latency, zero_ok=True)
        self.timeout = _seconds("timeout", timeout, zero_ok=False)
        if length is not None and not callable(length):
            raise TypeError(f"@batch: length must be a function item -> tokens, got {type(length).__name__}")
        if max_batch_tokens is not None:
            max_batch_tokens = _positive_int("max_batch_tokens", max_batch_tokens)
            if length is None:
                raise ValueError("@batch: max_batch_tokens needs length=, a function item -> tokens")
        self.length = length
        self.max_batch_tokens = max_batch_tokens
        if name is not None and not isinstance(name, str):
            raise TypeError(f"@batch: name must be a str, got {type(name).__name__}")
        self.name = name

    def batcher(self, backend_or_model: Any, name: str) -> Batcher:
        return Batcher(
            backend_or_model,
            max_batch_size=self.max_batch_size,
            max_latency=self.max_latency,
            max_queue_size=self.max_queue_size,
            timeout=self.timeout,
            name=self.name or name,
            length=self.length,
            max_batch_tokens=self.max_batch_tokens,
        )


def _positive_int(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"@batch: {what} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"@batch: {what} must be at least 1, got {value}")
    return value


def _seconds(what: str, value: Any, zero_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"@batch: {what} must be a number of seconds, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"@batch: {what} must be a finite number of seconds {bound}, got {value}")
    return float(value)


# --------------------------------------------------------------------------- what is decorated


class _Target:
    """The decorated function and what was learnt about it: async or not, method or not."""

    def __init__(self, func: Any):
        if isinstance(func, (staticmethod, classmethod)):
            kind = type(func).__name__
            raise TypeError(f"@batch goes below @{kind}: @{kind} then @batch, then the def")
        if isinstance(func, _Batched):
            raise TypeError(f"{_qualname(func)} is already batched")
        if inspect.isclass(func):
            raise TypeError(
                f"@batch decorates the function or method that takes the list of items, not a class "
                f"({func.__name__}); for a class with predict(), use Batcher({func.__name__})"
            )
        if not callable(func):
            hint = ""
            if isinstance(func, (int, float)):
                hint = "; give options by keyword: @batch(max_batch_size=...)"
            elif callable(getattr(func, "predict", None)):
                hint = "; for an object with predict(), use Batcher(obj) or @batch on its method"
            raise TypeError(f"@batch decorates a function or method, got {type(func).__name__} {func!r}{hint}")
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(f"@batch: {_qualname(func)} is a generator; it must return a list, one result per item")
        self.func = func
        self.qualname = _qualname(func)
        # an object whose __call__ is an async def counts as one too
        self.is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)
        self.is_method = self._check_signature()

    def _check_signature(self) -> bool:
        """True for a method (``self, items``), False for a function (``items``).

        A method is a function defined in a class body whose first parameter is ``self``
        (a static method there is a function).  A signature Python cannot read (a builtin)
        is trusted.
        """
        try:
            signature = inspect.signature(self.func)
        except (TypeError, ValueError):
            return False
        first = next(iter(signature.parameters), None)
        method = _defined_in_class(self.func) and first == "self"
        if _accepts(signature, 2 if method else 1):
            return method
        shape = "(self, items)" if method else "(items)"
        raise TypeError(
            f"@batch: {self.qualname}{signature} must take one argument, the list of items: "
            f"def {getattr(self.func, '__name__', 'f')}{shape}"
        )

    def checked(self, outputs: Any, count: int) -> list[Any]:
        """The function's outputs as a list of ``count``, or a ModelError that names it."""
        if isinstance(outputs, (str, bytes, dict)) or not isinstance(outputs, Iterable):
            raise ModelError(
                f"{self.qualname} returned {type(outputs).__name__}; a @batch function returns a list, "
                f"one result per item"
            )
        results = list(outputs)
        if len(results) != count:
            raise ModelError(
                f"{self.qualname} returned {len(results)} results for {count} items; a @batch function "
                f"returns one result per item, in order"
            )
        return results


def _qualname(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or type(func).__name__


def _defined_in_class(func: Any) -> bool:
    parts = getattr(func, "__qualname__", "").split(".")
    return len(parts) > 1 and parts[-2] != "<locals>"


def _accepts(signature: inspect.Signature, count: int) -> bool:
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True


class _CoroutineBackend(Backend):
    """Runs an ``async def`` batch function on the batcher's loop, one batch at a time."""

    def __init__(self, run: Callable[[list[Any]], Awaitable[list[Any]]], name: str):
        self._run = run
        self._name = name
        self._up = False

    async def start(self) -> None:
        self._up = True
        self._capacity_changed()

    @property
    def capacity(self) -> int:
        return 1 if self._up else 0

    async def run(self, batch: list[Any]) -> list[Any]:
        return await self._run(batch)

    async def close(self) -> None:
        self._up = False

    def describe(self) -> dict[str, Any]:
        return {"backend": "coroutine", "function": self._name, "workers_up": self.capacity}


# --------------------------------------------------------------------------- one binding's batchers


class _Binding:
    """The batcher(s) of one decorated function, or of one method on one instance.

    A plain function has one batcher, on a private loop thread.  An ``async def`` has one
    per event loop it is called on (a batcher lives on one loop; a second ``asyncio.run``
    gets a fresh one).  The batch function reaches a method's instance through a weak
    reference, so a running batcher never keeps its instance alive.
    """

    def __init__(self, target: _Target, options: _Options, instance: Any = None):
        self.target = target
        self.options = options
        self.name = target.qualname
        self._instance = None if instance is None else weakref.ref(instance)
        self._lock = threading.Lock()
        self._by_loop: dict[asyncio.AbstractEventLoop, Batcher] = {}
        self._latest: Batcher | None = None
        self.stopped = False
        if not target.is_async:
            self._latest = options.batcher(self._run_sync, self.name)

    # the batch function, with its instance when it is a method

    def _call_args(self) -> tuple[Any, ...]:
        if self._instance is None:
            return ()
        instance = self._instance()
        if instance is None:
            raise NotReadyError(f"{self.name}: its instance was freed")
        return (instance,)

    def _run_sync(self, items: list[Any]) -> list[Any]:
        try:
            outputs = self.target.func(*self._call_args(), items)
        except BatchserveError:
            raise
        except Exception as error:
            raise _model_error(error) from error
        return self.target.checked(outputs, len(items))

    async def _run_async(self, items: list[Any]) -> list[Any]:
        try:
            outputs = await self.target.func(*self._call_args(), items)
        except BatchserveError:
            raise
        except Exception as error:
            raise _model_error(error) from error
        return self.target.checked(outputs, len(items))

    # batchers

    def sync_batcher(self) -> Batcher:
        assert self._latest is not None
        if self.stopped:  # a batcher stopped before it ever started would start afresh
            raise NotReadyError(f"{self.name} was stopped")
        return self._latest

    def loop_batcher(self, loop: asyncio.AbstractEventLoop) -> Batcher:
        """The batcher of ``loop`` (made on first use; those of closed loops are dropped)."""
        with self._lock:
            if self.stopped:
                raise NotReadyError(f"{self.name} was stopped")
            batcher = self._by_loop.get(loop)
            if batcher is None:
                for old in [old for old in self._by_loop if old.is_closed()]:
                    _abandon(self._by_loop.pop(old))
                backend = _CoroutineBackend(self._run_async, self.name)
                batcher = self._by_loop[loop] = self._latest = self.options.batcher(backend, self.name)
                _on_caller_loops.add(batcher)
            return batcher

    def current(self) -> Batcher:
        """The batcher a call from here would use (for an async function: this loop's, else the latest)."""
        if not self.target.is_async:
            assert self._latest is not None
            return self._latest
        loop = _running_loop()
        if self.stopped:
            loop = None
        if loop is not None:
            return self.loop_batcher(loop)
        if self._latest is None:
            raise AttributeError(f"{self.name} has no batcher yet: an async function gets one on its first call")
        return self._latest

    def _all(self) -> list[Batcher]:
        with self._lock:
            self.stopped = True
            if not self.target.is_async:
                assert self._latest is not None
                return [self._latest]
            return list(self._by_loop.values())

    # stopping

    def stop(self, grace: float) -> None:
        running = _running_loop()
        for batcher in self._all():
            loop = batcher._loop
            if loop is None or loop.is_closed():
                _on_caller_loops.discard(batcher)
                continue
            if loop is running:
                raise RuntimeError(f"on the event loop of {self.name}, use 'await {self.name}.close()'")
            if self.target.is_async and not loop.is_running():
                loop.run_until_complete(batcher.close(grace))
            else:
                batcher.stop(grace)
            _on_caller_loops.discard(batcher)

    async def close(self, grace: float) -> None:
        running = asyncio.get_running_loop()
        for batcher in self._all():
            loop = batcher._loop
            if loop is not None and not loop.is_closed() and loop is not running and not loop.is_running():
                continue  # a loop at rest cannot close it now: the exit hook will
            await batcher.close(grace)
            _on_caller_loops.discard(batcher)

    def release(self) -> None:
        """Stop without blocking (the instance was freed: this may run anywhere, even on the
        batcher's own threads, wherever the garbage collector happened to run)."""
        for batcher in self._all():
            loop = batcher._loop
            if loop is None or loop.is_closed():
                _abandon(batcher)
            elif self.target.is_async:
                try:
                    loop.call_soon_threadsafe(_close_on_loop, batcher)
                except RuntimeError:  # closed in between
                    _abandon(batcher)
            else:
                try:
                    threading.Thread(target=batcher.stop, name=f"batchserve-stop-{self.name}", daemon=True).start()
                except RuntimeError:  # interpreter shutting down: batching's exit hook stops it
                    pass


def _model_error(error: Exception) -> ModelError:
    """The error a caller gets for the function's exception: the Batcher's message, and the
    exception itself as ``__cause__`` (its traceback points into the function)."""
    return ModelError(f"{type(error).__name__}: {error}")


def _abandon(batcher: Batcher) -> None:
    """Forget a batcher whose loop was closed while its tasks were pending (``loop.close()``
    without cancelling them, as ``asyncio.run`` would): they can never run again, so their
    destruction is not worth asyncio's "Task was destroyed but it is pending!"."""
    _on_caller_loops.discard(batcher)
    for task in (batcher._dispatcher, *batcher._batch_tasks):
        if task is not None and not task.done() and hasattr(task, "_log_destroy_pending"):
            task._log_destroy_pending = False


def _close_on_loop(batcher: Batcher) -> None:
    task = asyncio.get_running_loop().create_task(batcher.close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)
    task.add_done_callback(lambda _: _on_caller_loops.discard(batcher))


@atexit.register
def _close_caller_loop_batchers() -> None:
    """At exit, close the batchers on callers' loops that were left open (a loop run with
    ``run_until_complete`` and never closed), so no task is destroyed while pending."""
    for batcher in list(_on_caller_loops):
        loop = batcher._loop
        try:
            if loop is None or loop.is_closed():
                _abandon(batcher)
                continue
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(batcher.close(), loop).result(timeout=5)
            else:
                loop.run_until_complete(batcher.close())
        except Exception:  # the others must still be closed
            log.exception("closing batcher %r at exit failed", batcher.name)
    _on_caller_loops.clear()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# --------------------------------------------------------------------------- what users hold


class _Batched:
    """Shared by the four shapes below: the batcher, stop and close."""

    _binding: _Binding

    @property
    def batcher(self) -> Batcher:
        """The :class:`Batcher` behind this function (``stats``, ``queue_depth``, ...)."""
        return self._binding.current()

    def stop(self, grace: float = 0.0) -> None:
        """Shut the batcher(s) down, waiting up to ``grace`` s for queued work; final.

        Blocking; on the function's own event loop use ``await f.close()``.
        """
        self._binding.stop(grace)

    async def close(self, grace: float = 0.0) -> None:
        """:meth:`stop`, awaited."""
        await self._binding.close(grace)

    def __repr__(self) -> str:
        return f"<batched {self._binding.name}>"


class Batched(_Batched, Generic[X, Y]):
    """A batched plain function (or a method bound to an instance): ``f(item) -> result``, blocking."""

    def __init__(self, binding: _Binding, instance: Any = None):
        self._binding = binding
        functools.update_wrapper(self, binding.target.func)
        if instance is not None:
            self.__self__ = instance  # as a bound method does: the instance lives while this does

    def __call__(self, item: X, *, timeout: float | None = None) -> Y:
        """The result for ``item``, computed in a batch with other callers' items."""
        result: Y = self._binding.sync_batcher().predict([item], timeout)[0]
        return result


class AsyncBatched(_Batched, Generic[X, Y]):
    """A batched ``async def`` (or such a method bound to an instance): ``await f(item) -> result``."""

    def __init__(self, binding: _Binding, instance: Any = None):
        self._binding = binding
        functools.update_wrapper(self, binding.target.func)
        if instance is not None:
            self.__self__ = instance  # as a bound method does: the instance lives while this does

    async def __call__(self, item: X, *, timeout: float | None = None) -> Y:
        """The result for ``item``, computed in a batch with other callers' items on this loop."""
        batcher = self._binding.loop_batcher(asyncio.get_running_loop())
        outputs = await batcher.submit([item], timeout)
        result: Y = outputs[0]
        return result


class _MethodDescriptor(Generic[S]):
    """One batcher per instance: made on the first access from that instance, stopped when
    the instance is freed (a weak reference's finalizer), never shared between instances."""

    _async = False

    def __init__(self, target: _Target, options: _Options):
        self._target = target
        self._options = options
        self._bindings: dict[int, _Binding] = {}  # by id(instance); an entry leaves with its instance
        self._lock = threading.Lock()
        functools.update_wrapper(self, target.func)

    def _binding_for(self, instance: S) -> _Binding:
        key = id(instance)
        binding = self._bindings.get(key)
        if binding is not None:
            return binding
        with self._lock:
            binding = self._bindings.get(key)
            if binding is None:
                try:
                    finalizer = weakref.finalize(instance, _release, self._bindings, key)
                except TypeError:
                    raise TypeError(
                        f"@batch on {self._target.qualname}: {type(instance).__name__} instances must be "
                        f"weak-referenceable (add '__weakref__' to its __slots__)"
                    ) from None
                finalizer.atexit = False  # at exit the batchers are stopped by the exit hooks
                binding = self._bindings[key] = _Binding(self._target, self._options, instance)
        return binding

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        name = self._target.qualname
        raise TypeError(f"{name} is a batched method: call it on an instance, obj.{name.rpartition('.')[2]}(item)")

    @property
    def batcher(self) -> Batcher:
        raise AttributeError(
            f"each instance has its own batcher: obj.{self._target.qualname.rpartition('.')[2]}.batcher"
        )

    def __repr__(self) -> str:
        return f"<batched method {self._target.qualname}>"


def _release(bindings: dict[int, _Binding], key: int) -> None:
    binding = bindings.pop(key, None)
    if binding is not None:
        binding.release()


class BatchedMethod(_MethodDescriptor[S], Generic[S, X, Y]):
    """A batched method: ``obj.method(item) -> result``, blocking, one batcher per instance."""

    @overload
    def __get__(self, instance: None, owner: Any = None) -> BatchedMethod[S, X, Y]: ...
    @overload
    def __get__(self, instance: S, owner: Any = None) -> Batched[X, Y]: ...
    def __get__(self, instance: S | None, owner: Any = None) -> BatchedMethod[S, X, Y] | Batched[X, Y]:
        if instance is None:
            return self
        return Batched(self._binding_for(instance), instance)


class AsyncBatchedMethod(_MethodDescriptor[S], Generic[S, X, Y]):
    """A batched ``async def`` method: ``await obj.method(item)``, one batcher per instance and loop."""

    @overload
    def __get__(self, instance: None, owner: Any = None) -> AsyncBatchedMethod[S, X, Y]: ...
    @overload
    def __get__(self, instance: S, owner: Any = None) -> AsyncBatched[X, Y]: ...
    def __get__(self, instance: S | None, owner: Any = None) -> AsyncBatchedMethod[S, X, Y] | AsyncBatched[X, Y]:
        if instance is None:
            return self
        return AsyncBatched(self._binding_for(instance), instance)


# --------------------------------------------------------------------------- the decorator


class BatchDecorator(Protocol):
    """What ``batch(...)`` with options returns: the decorator itself."""

    @overload
    def __call__(self, func: Callable[[list[X]], Awaitable[Iterable[Y]]], /) -> AsyncBatched[X, Y]: ...
    @overload
    def __call__(self, func: Callable[[S, list[X]], Awaitable[Iterable[Y]]], /) -> AsyncBatchedMethod[S, X, Y]: ...
    @overload
    def __call__(self, func: Callable[[list[X]], Iterable[Y]], /) -> Batched[X, Y]: ...
    @overload
    def __call__(self, func: Callable[[S, list[X]], Iterable[Y]], /) -> BatchedMethod[S, X, Y]: ...


@overload
def batch(func: Callable[[list[X]], Awaitable[Iterable[Y]]], /) -> AsyncBatched[X, Y]: ...
@overload
def batch(func: Callable[[S, list[X]], Awaitable[Iterable[Y]]], /) -> AsyncBatchedMethod[S, X, Y]: ...
@overload
def batch(func: Callable[[list[X]], Iterable[Y]], /) -> Batched[X, Y]: ...
@overload
def batch(func: Callable[[S, list[X]], Iterable[Y]], /) -> BatchedMethod[S, X, Y]: ...
@overload
def batch(
    *,
    max_batch_size: int = 32,
    max_latency: float = 0.01,
    timeout: float = 30.0,
    max_queue_size: int = 1024,
    length: Callable[[Any], int] | None = None,
    max_batch_tokens: int | None = None,
    name: str | None = None,
) -> BatchDecorator: ...
def batch(
    func: Any = None,
    /,
    *,
    max_batch_size: int = 32,
    max_latency: float = 0.01,
    timeout: float = 30.0,
    max_queue_size: int = 1024,
    length: Callable[[Any], int] | None = None,
    max_batch_tokens: int | None = None,
    name: str | None = None,
) -> Any:
    """Batch calls of ``func(items: list) -> list``: the decorated ``func(item)`` returns one result.

    Use as ``@batch`` or ``@batch(max_batch_size=..., ...)``; the options are
    :class:`~batchserve.batching.Batcher`'s: ``max_batch_size`` items at most per call of
    ``func``; ``max_latency`` seconds at most that a queued item waits for others (none when
    the function is idle); ``timeout`` seconds per call by default (each call may pass its
    own, ``f(item, timeout=...)``); ``max_queue_size`` items waiting at most; ``length`` and
    ``max_batch_tokens`` for token budgets; ``name`` for messages and the thread's name.
    Checked here, so a mistake fails at import rather than at the first call.
    """
    options = _Options(max_batch_size, max_latency, timeout, max_queue_size, length, max_batch_tokens, name)

    def decorate(func: Any) -> Any:
        target = _Target(func)
        if target.is_method:
            return (AsyncBatchedMethod if target.is_async else BatchedMethod)(target, options)
        binding = _Binding(target, options)
        return (AsyncBatched if target.is_async else Batched)(binding)

    if func is None:
        return decorate
    return decorate(func)
