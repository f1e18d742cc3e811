"""ShannonAI service-streamer's Redis names on top of the redis backend.

``RedisStreamer`` is a front (:class:`~batchserve.backends.redis.front.RedisBackend`);
``RedisWorker(...).run_forever()`` and ``run_redis_workers_forever(...)`` serve it (as
``batchserve worker`` does).  They talk through the streams of the model named ``model``
under ``prefix``, so ``batchserve worker --model model=module:attr --prefix P`` serves a
``RedisStreamer(prefix=P)`` too.

As in service-streamer, a ``RedisStreamer`` call made while no worker is up yet is written
to the stream at once and waits there for a worker (within ``worker_timeout``, then
``TimeoutError`` and its entry is deleted), so workers may still be loading, or not started
yet, when the first call comes; and workers run in a thread of a script (``daemon=True``) stop
with it: at interpreter exit they finish what they hold, leave and stop their processes.

Where service-streamer's behaviour was unsound, ours differs: entries are msgpack (never
pickle); a request whose worker died is taken over by another worker; a model error
reaches the caller; ``run_redis_workers_forever`` supervises its ``worker_num`` processes
(restarted when they die) and feeds them from one consumer.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import os
import threading
import time
from typing import Any, Callable, Iterable

from batchserve.backends.process import ProcessBackend
from batchserve.backends.redis.connection import TLSFiles
from batchserve.backends.redis.front import RedisBackend
from batchserve.backends.redis.worker import serve_batchers
from batchserve.backends.thread import ThreadBackend
from batchserve.batching import Batcher
from batchserve.compat.streamer import MAX_QUEUED_ITEMS, ManagedModel, ManagedModelLoader, _Streamer
from batchserve.model import ModelSpec

#: the model name in the stream keys: ``batchserve:<prefix>:model:requests``
MODEL_NAME = "model"
#: the front merges nothing itself (the workers batch); this only bounds one entry
FRONT_BATCH_SIZE = 64
#: at interpreter exit, how long workers serving in threads get to finish and leave
EXIT_GRACE = 15.0


class RedisStreamer(_Streamer):
    """service-streamer's ``RedisStreamer``: ``predict`` / ``submit`` run on Redis workers.

    ``redis_broker`` is ``"host:port"`` as in service-streamer, or a Redis URL
    (``redis://[user:password@]host:port/db``, ``rediss://`` for TLS, with ``redis_ca_file``
    and, for a Redis that asks for one, ``redis_certfile`` and ``redis_keyfile``: as
    ``--redis-ca-file`` and the others).  While no worker serves ``prefix`` yet, a call is
    queued in the stream all the same and waits for a worker to answer it, up to
    ``worker_timeout``, then raises ``TimeoutError`` (its entry deleted: never computed).
    """

    def __init__(
        self,
        redis_broker: str = "localhost:6379",
        prefix: str = "",
        *,
        worker_timeout: float = 20,
        redis_ca_file: str | None = None,
        redis_certfile: str | None = None,
        redis_keyfile: str | None = None,
    ):
        backend = RedisBackend(
            redis_broker, MODEL_NAME, prefix=prefix, default_timeout=worker_timeout, wait_for_workers=True,
            tls=TLSFiles(redis_ca_file, redis_certfile, redis_keyfile),
        )
        batcher = Batcher(
            backend,
            max_batch_size=FRONT_BATCH_SIZE,
            max_latency=0.0,
            max_queue_size=MAX_QUEUED_ITEMS,
            timeout=worker_timeout,
            name=MODEL_NAME,
        )
        super().__init__(batcher, worker_timeout, wait_for_worker_ready=False)


class RedisWorker:
    """service-streamer's ``RedisWorker``: one model instance serving a ``RedisStreamer``.

    ``model_class`` is a :class:`ManagedModel` subclass (built as ``model_class(gpu_id)``
    then ``init_model(*model_init_args, **model_init_kwargs)``), or any batchserve model: a
    class with ``load()`` / ``predict()`` (built with the init args) or a function.
    ``redis_ca_file``, ``redis_certfile``, ``redis_keyfile``: as for :class:`RedisStreamer`.
    """

    def __init__(
        self,
        model_class: type | Callable[[list], list],
        batch_size: int,
        max_latency: float = 0.1,
        redis_broker: str = "localhost:6379",
        prefix: str = "",
        model_init_args: Iterable | None = None,
        model_init_kwargs: dict | None = None,
        *,
        redis_ca_file: str | None = None,
        redis_certfile: str | None = None,
        redis_keyfile: str | None = None,
    ):
        self.spec = _model_spec(model_class, model_init_args, model_init_kwargs)
        self.batch_size = batch_size
        self.max_latency = max_latency
        self.redis_broker = redis_broker
        self.prefix = prefix
        self.tls = TLSFiles(redis_ca_file, redis_certfile, redis_keyfile)

    def run_forever(self, gpu_id: int | None = None) -> None:
        """Load the model (on GPU ``gpu_id`` if given) and serve until SIGTERM / SIGINT."""
        if gpu_id is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_id)
        batcher = _worker_batcher(ThreadBackend(self.spec), self.batch_size, self.max_latency)
        _serve(batcher, self.redis_broker, self.prefix, self.tls)


def run_redis_workers_forever(
    model_class: type | Callable[[list], list],
    batch_size: int,
    max_latency: float = 0.1,
    worker_num: int = 1,
    cuda_devices: Iterable[int] | None = None,
    redis_broker: str = "localhost:6379",
    prefix: str = "",
    mp_start_method: str = "spawn",
    model_init_args: Iterable | None = None,
    model_init_kwargs: dict | None = None,
    *,
    redis_ca_file: str | None = None,
    redis_certfile: str | None = None,
    redis_keyfile: str | None = None,
) -> None:
    """Serve a ``RedisStreamer`` with ``worker_num`` supervised model processes (blocks).

    Worker ``i`` runs on GPU ``cuda_devices[i % len(cuda_devices)]`` when given, else on
    the CPU.  ``model_class`` must be importable by name (spawned processes import it).
    In the main thread it serves until SIGTERM / SIGINT; in another thread, until the
    interpreter exits.  ``redis_ca_file``, ``redis_certfile``, ``redis_keyfile``: as for
    :class:`RedisStreamer`.
    """
    tls = TLSFiles(redis_ca_file, redis_certfile, redis_keyfile)
    tls.check(redis_broker)  # before any process starts
    spec = _model_spec(model_class, model_init_args, model_init_kwargs)
    devices = [int(gpu) for gpu in cuda_devices] if cuda_devices is not None else "cpu"
    backend = ProcessBackend(
        spec, workers=worker_num, devices=devices, start_method=mp_start_method, name=MODEL_NAME
    )
    batcher = _worker_batcher(backend, batch_size, max_latency)
    _serve(batcher, redis_broker, prefix, tls)


def _serve(batcher: Batcher, redis_broker: str, prefix: str, tls: TLSFiles) -> None:
    """Serve ``batcher`` until SIGTERM / SIGINT (main thread) or interpreter exit (other threads)."""
    if threading.current_thread() is threading.main_thread():
        asyncio.run(serve_batchers({MODEL_NAME: batcher}, redis_broker, prefix, tls=tls))
        return
    serving = _ServingThread()
    with _serving_lock:
        _serving_threads.add(serving)
    try:
        asyncio.run(serving.serve(batcher, redis_broker, prefix, tls))
    finally:
        with _serving_lock:
            _serving_threads.discard(serving)
        serving.ended.set()


class _ServingThread:
    """One serve loop in a thread other than the main one; :meth:`stop_soon` ends it from any thread."""

    def __init__(self) -> None:
        self.ended = threading.Event()  # set once its loop is closed
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = False

    async def serve(self, batcher: Batcher, redis_broker: str, prefix: str, tls: TLSFiles) -> None:
        with self._lock:
            if self._stopping:
                return
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        await serve_batchers({MODEL_NAME: batcher}, redis_broker, prefix, stop=self._stop, tls=tls)

    def stop_soon(self) -> None:
        with self._lock:
            self._stopping = True
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._stop.set)
                except RuntimeError:  # its loop already closed
                    pass


_serving_threads: set[_ServingThread] = set()
_serving_lock = threading.Lock()


@atexit.register
def _stop_serving_threads() -> None:
    """Workers serving in (daemon) threads finish what they hold, leave, and stop their processes.

    Registered after the batcher's and the process backend's exit hooks, so it runs before them.
    """
    with _serving_lock:
        serving = list(_serving_threads)
    for thread in serving:
        thread.stop_soon()
    deadline = time.monotonic() + EXIT_GRACE
    for thread in serving:
        thread.ended.wait(max(deadline - time.monotonic(), 0.0))


def _model_spec(model_class: Any, init_args: Iterable | None, init_kwargs: dict | None) -> ModelSpec:
    if inspect.isclass(model_class) and issubclass(model_class, ManagedModel):
        return ModelSpec(ManagedModelLoader, (model_class, tuple(init_args or ()), dict(init_kwargs or {})))
    return ModelSpec(model_class, tuple(init_args or ()), dict(init_kwargs or {}))


def _worker_batcher(backend, batch_size: int, max_latency: float) -> Batcher:
    return Batcher(
        backend,
        max_batch_size=batch_size,
        max_latency=max_latency,
        max_queue_size=MAX_QUEUED_ITEMS,
        timeout=3600.0,  # each entry brings its own deadline
        name=MODEL_NAME,
    )
