"""ShannonAI service-streamer's local names on top of :class:`~batchserve.batching.Batcher`.

``ThreadedStreamer`` runs the model in a thread of this process; ``Streamer`` runs it in
``worker_num`` supervised worker processes (:class:`~batchserve.backends.ProcessBackend`),
round-robin over ``cuda_devices``.  Both keep service-streamer's signatures and its
``predict(batch)`` / ``submit(batch).result(timeout)`` / ``destroy_workers()`` calls.

Where service-streamer's behaviour was unsound, ours differs:

* an exception in ``predict`` reaches the callers whose items raised it (as
  :class:`~batchserve.errors.ModelError` carrying the message); in service-streamer it
  killed the worker and every caller waited for its timeout;
* no call waits past ``worker_timeout``: ``predict`` and ``result()`` raise
  :class:`TimeoutError` (``DeadlineExceededError``) then, even with ``result(timeout=None)``;
* a worker process that dies is restarted, and its batch is retried once on another;
  workers that die before any was ever ready (a spawned worker re-running a script that
  lacks ``if __name__ == "__main__":``) fail the start with their own error, where
  service-streamer restarted them forever;
* GPU 0 is a GPU: ``cuda_devices=(0, 1)`` puts workers on GPUs 0 and 1, and each worker's
  ``CUDA_VISIBLE_DEVICES`` is set before it imports anything;
* a lone request does not wait ``max_latency``; batches form while the model is busy.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import os
import threading
import time
from typing import Any, Callable, Iterable

from batchserve.backends.process import ProcessBackend
from batchserve.backends.thread import ThreadBackend
from batchserve.batching import Batcher
from batchserve.errors import DeadlineExceededError, NotReadyError
from batchserve.model import ModelSpec

#: service-streamer's queues were unbounded; ours is bounded, but far above any batch.
MAX_QUEUED_ITEMS = 100_000


class ManagedModel:
    """A model that loads in each worker process: subclass it, as with service-streamer.

    The worker calls ``YourModel(gpu_id)`` then ``init_model(*model_init_args,
    **model_init_kwargs)``, then ``predict(batch)`` for every batch.  ``gpu_id`` is the GPU
    this worker was given (``None`` on the CPU); the worker already sees only that GPU,
    as ``cuda`` (``cuda:0``).
    """

    def __init__(self, gpu_id: int | None = None):
        self.model = None
        self.gpu_id = gpu_id
        self.set_gpu_id(gpu_id)

    @staticmethod
    def set_gpu_id(gpu_id: int | None = None) -> None:
        if gpu_id is not None:  # GPU 0 included (service-streamer skipped it)
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_id)

    def init_model(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("load your model in init_model()")

    def predict(self, batch: list[Any]) -> list[Any]:
        raise NotImplementedError("return one output per input in predict(batch)")


class ManagedModelLoader:
    """Adapts a :class:`ManagedModel` subclass to batchserve's ``load()`` / ``predict()``."""

    def __init__(self, model_class: type[ManagedModel], init_args: Iterable[Any] = (), init_kwargs: dict[str, Any] | None = None):
        self.model_class = model_class
        self.init_args = tuple(init_args)
        self.init_kwargs = dict(init_kwargs or {})
        self.instance: ManagedModel | None = None

    def load(self) -> None:
        self.instance = self.model_class(_worker_gpu_id())
        self.instance.init_model(*self.init_args, **self.init_kwargs)

    def predict(self, batch: list[Any]) -> list[Any]:
        if self.instance is None:
            raise RuntimeError("model used before load()")
        return self.instance.predict(batch)


def _worker_gpu_id() -> int | None:
    """The GPU the process backend gave this worker (its ``CUDA_VISIBLE_DEVICES``), if any."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return int(visible) if visible.isdigit() else None


class StreamerFuture:
    """What ``submit()`` returns: ``result(timeout=None)`` gives the batch's outputs."""

    def __init__(self, future: concurrent.futures.Future[list[Any]]):
        self._future = future

    def result(self, timeout: float | None = None) -> list[Any]:
        """The outputs, in order; raises the model's error, or TimeoutError past ``timeout``."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            if self._future.done():
                raise  # the request's own deadline (worker_timeout) passed
            raise TimeoutError(f"no result within {timeout:g} s") from None

    def done(self) -> bool:
        return self._future.done()


class _Streamer:
    """The calls both streamers share; the batcher does the work."""

    def __init__(self, batcher: Batcher, worker_timeout: float, wait_for_worker_ready: bool):
        self._batcher = batcher
        self._worker_timeout = worker_timeout
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._destroyed = False
        starter = threading.Thread(target=self._start, name="batchserve-streamer-start", daemon=True)
        starter.start()
        if wait_for_worker_ready:
            self._wait_started(None)

    def _start(self) -> None:
        try:
            self._batcher.start_in_thread()
        except BaseException as error:  # noqa: BLE001 - reported to every later call
            self._start_error = error
        finally:
            self._started.set()

    def _wait_started(self, timeout: float | None) -> None:
        if not self._started.wait(timeout):
            raise DeadlineExceededError(f"workers not ready after {timeout:g} s")
        if self._start_error is not None:
            raise self._start_error

    def submit(self, batch: Iterable[Any]) -> StreamerFuture:
        """Queue ``batch``; its outputs come from the returned future's ``result()``."""
        if self._destroyed:
            raise NotReadyError("destroy_workers() was called: this streamer no longer serves")
        deadline = time.monotonic() + self._worker_timeout
        self._wait_started(self._worker_timeout)
        remaining = deadline - time.monotonic()
        # the batcher reads the items (a str is refused there: list("abc") would be three inputs)
        return StreamerFuture(self._batcher.submit_future(batch, timeout=max(remaining, 1e-3)))

    def predict(self, batch: Iterable[Any]) -> list[Any]:
        """The outputs for ``batch``, in order, batched with every concurrent caller's items."""
        return self.submit(batch).result()

    def destroy_workers(self, timeout: float | None = None) -> None:
        """Stop the worker thread or processes; later calls fail at once.

        Work already submitted finishes first (service-streamer's README calls ``submit()``,
        then ``destroy_workers()``, then ``result()``), for at most ``timeout`` seconds
        (default ``worker_timeout``, which no request outlives anyway); what is still queued
        or running then fails with :class:`~batchserve.errors.NotReadyError`.
        """
        self._destroyed = True
        self._started.wait()
        self._batcher.stop(grace=self._worker_timeout if timeout is None else timeout)


class ThreadedStreamer(_Streamer):
    """service-streamer's ``ThreadedStreamer``: the model runs in one thread of this process."""

    def __init__(
        self,
        predict_function: Callable[[list[Any]], list[Any]],
        batch_size: int,
        max_latency: float = 0.1,
        worker_timeout: float = 20,
    ):
        batcher = Batcher(
            ThreadBackend(ModelSpec(predict_function)),
            max_batch_size=batch_size,
            max_latency=max_latency,
            max_queue_size=MAX_QUEUED_ITEMS,
            timeout=worker_timeout,
            name=_name(predict_function),
        )
        super().__init__(batcher, worker_timeout, wait_for_worker_ready=True)


class Streamer(_Streamer):
    """service-streamer's ``Streamer``: the model runs in ``worker_num`` worker processes.

    ``predict_function_or_model`` is a module-level function or a :class:`ManagedModel`
    subclass (spawned workers import it by name).  With ``mp_start_method='fork'`` and no
    GPUs, a model is loaded once here and its weights are shared by the forked workers.
    """

    def __init__(
        self,
        predict_function_or_model: Callable[[list[Any]], list[Any]] | type,
        batch_size: int,
        max_latency: float = 0.1,
        worker_num: int = 1,
        cuda_devices: Iterable[int] | None = None,
        model_init_args: Iterable[Any] | None = None,
        model_init_kwargs: dict[str, Any] | None = None,
        wait_for_worker_ready: bool = False,
        mp_start_method: str = "spawn",
        worker_timeout: float = 20,
    ):
        target = predict_function_or_model
        if inspect.isclass(target) and issubclass(target, ManagedModel):
            spec = ModelSpec(ManagedModelLoader, (target, model_init_args or (), model_init_kwargs or {}))
        else:
            spec = ModelSpec(target)
        devices: str | list[int] = [int(gpu) for gpu in cuda_devices] if cuda_devices is not None else "cpu"
        batcher = Batcher(
            ProcessBackend(spec, workers=worker_num, devices=devices, start_method=mp_start_method, name=_name(target)),
            max_batch_size=batch_size,
            max_latency=max_latency,
            max_queue_size=MAX_QUEUED_ITEMS,
            timeout=worker_timeout,
            name=_name(target),
        )
        super().__init__(batcher, worker_timeout, wait_for_worker_ready)


def _name(target: Any) -> str:
    return getattr(target, "__qualname__", None) or type(target).__name__
