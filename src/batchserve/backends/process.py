"""Process backend: N supervised worker processes, each with its own model instance.

The one :class:`~batchserve.batching.Batcher` in the front process hands each batch to a
free worker; this backend knows which are free (one slot per worker).

* **Placement.** Worker ``i`` runs on ``devices[i % len(devices)]`` (``cpu`` or ``cuda:N``,
  GPU 0 included), with ``CUDA_VISIBLE_DEVICES`` set before it imports a framework, and
  ``cores // workers`` torch threads on the CPU unless told otherwise (:mod:`batchserve.devices`).
* **One copy of the weights.** CPU workers *fork* from a front that has loaded the model
  once (CPU only, one torch thread, ``gc.freeze()`` before each fork), so the weights are
  shared copy-on-write.  GPU workers *spawn* and load their own copy.
* **Supervision.** A worker that dies is restarted at once — with exponential backoff if it
  died before it was ready.  While no worker has ever been ready, a start whose every worker
  died twice fails with the last one's own error (what it printed on stderr: until ready, a
  worker's stderr is a pipe the front reads and passes on), not restarts until
  ``start_timeout``: a spawned worker that re-runs a script without an
  ``if __name__ == "__main__":`` guard dies the same way every time.  The batch it held fails with
  :class:`~batchserve.errors.WorkerDiedError`, which the batcher retries once on another
  worker.  A worker is recycled after ``max_batches`` batches (plus up to 10 % jitter, so
  they do not all recycle at once).  Shutdown stops every worker, then kills what is left
  after a grace, and reaps them all: no orphans, no zombies.  Workers ignore SIGTERM (from
  the moment they start: it is blocked while they are created), so a SIGTERM sent to the
  whole process group reaches the front alone, which drains and then stops them: no worker
  dies of it, none is restarted, none is reported as a failure.

Everything here runs on the batcher's event loop: the pipes and the processes' exit
sentinels are watched with ``loop.add_reader``, so no thread is spent per worker.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import gc
import logging
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterable, Iterator

from batchserve.aio import wait_event
from batchserve.backends.base import Backend, load_before_fork
from batchserve.backends.child import InheritedFd, WorkerConfig, serve
from batchserve.devices import environment, is_gpu, parse_devices, threads_per_worker, worker_env
from batchserve.errors import ModelError, NotReadyError, WorkerDiedError
from batchserve.model import Model, ModelSpec
from batchserve.settings import Settings

log = logging.getLogger("batchserve.workers")

BACKOFF_FIRST = 0.5  # seconds before restarting a worker that died before it was ready
BACKOFF_MAX = 30.0
NEVER_READY_TRIES = 2  # deaths before ready, each worker, before a start that never had one ready fails
STOP_GRACE = 5.0  # seconds a worker gets to exit after "stop", then SIGKILL


class State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"  # recycled: finishing, then exits; a replacement is on its way
    DEAD = "dead"


@dataclass(eq=False)
class _Worker:
    slot: int
    process: Any  # multiprocessing.Process of one of the contexts
    conn: Connection
    limit: int | None  # batches before recycling
    state: State = State.STARTING
    job: asyncio.Future[tuple[Any, ...]] | None = None
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    start_timer: asyncio.TimerHandle | None = None
    stderr: _StderrPipe | None = None  # what it writes on stderr until it is ready

    @property
    def up(self) -> bool:
        return self.state in (State.IDLE, State.BUSY)


class ProcessBackend(Backend):
    """Runs batches on ``workers`` supervised processes (see the module docstring).

    ``start_method`` is ``fork`` when every device is a CPU (and the platform forks), else
    ``spawn``; ``preload`` (default: with fork) loads the model once in this process before
    forking.  ``start_timeout`` bounds how long a worker may take to load its model.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        workers: int = 1,
        devices: str | Iterable[object] = "cpu",
        threads_per_worker: int | None = None,
        max_batches: int | None = None,
        start_method: str | None = None,
        preload: bool | None = None,
        start_timeout: float = 600.0,
        name: str = "model",
    ):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.spec = spec
        self.workers = workers
        self.devices = parse_devices(devices)
        self.threads = threads_per_worker
        self.max_batches = max_batches or None
        self.start_method = start_method or _default_start_method(self.devices)
        if self.start_method == "fork" and any(is_gpu(device) for device in self.devices):
            raise ValueError("GPU workers cannot fork (CUDA does not survive fork): use spawn")
        self.preload_model = (self.start_method == "fork") if preload is None else preload
        if self.preload_model and self.start_method != "fork":
            raise ValueError("preload shares the weights through fork: it needs start_method='fork'")
        self.start_timeout = start_timeout
        self.name = name
        self.restarts = 0
        self._context = multiprocessing.get_context(self.start_method)
        self._model: Model | None = None  # loaded here, when preloading
        self._slots: list[_Worker | None] = [None] * workers
        self._failures = [0] * workers  # consecutive deaths before ready, per slot
        self._retiring: set[_Worker] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._freed: asyncio.Event | None = None
        self._start_error: BaseException | None = None
        self._started = False
        self._ever_ready = False
        self._last_death = ""  # how the latest worker that was never ready died, and its last words
        self._closed = False
        self._model_facts: dict[str, Any] = {}  # what the latest ready worker's model said about itself

    @classmethod
    def from_settings(cls, spec: ModelSpec, settings: Settings, name: str) -> "ProcessBackend":
        process = settings.process
        return cls(
            spec,
            workers=process.workers,
            devices=process.devices,
            # every process that computes shares the cores: each HTTP process has its own workers
            threads_per_worker=process.threads_per_worker
            or threads_per_worker(process.workers * settings.server.http_workers),
            max_batches=process.max_batches_per_worker,
            name=name,
        )

    @property
    def _started_loop(self) -> asyncio.AbstractEventLoop:
        """The loop :meth:`start` ran on (everything after it runs there)."""
        assert self._loop is not None, "backend not started"
        return self._loop

    @property
    def _freed_event(self) -> asyncio.Event:
        """Set when a slot may have become free (or the start can go on)."""
        assert self._freed is not None, "backend not started"
        return self._freed

    # ---------------------------------------------------------------- Backend interface

    def preload(self) -> None:
        """Load the model in this process now, so that forked workers share it."""
        if self.preload_model and self._model is None:
            self._model = load_before_fork(self.spec)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._freed = asyncio.Event()
        if self.preload_model and self._model is None:
            await self._loop.run_in_executor(None, self.preload)
        _live_backends.add(self)
        if self.start_method == "fork":
            gc.collect()  # what is frozen before each fork should be live objects only
        for slot in range(self.workers):
            self._spawn(slot)
        await self._wait_started()
        self._started = True

    @property
    def capacity(self) -> int:
        return sum(1 for worker in self._slots if worker is not None and worker.up)

    async def run(self, batch: list[Any]) -> list[Any]:
        worker = await self._acquire()
        worker.state = State.BUSY
        worker.job = job = self._started_loop.create_future()
        try:
            worker.conn.send(("batch", batch))
        except OSError:
            pass  # it died (broken pipe): its exit sentinel fails the job
        except Exception as error:  # pickling failed before anything was written
            worker.job = None
            self._set_idle(worker)
            raise ModelError(f"inputs cannot be sent to a worker process: {error}") from None
        kind, payload = await job
        if kind == "error":
            raise ModelError(payload)
        outputs: list[Any] = payload
        return outputs

    async def close(self) -> None:
        self._closed = True
        for timer in self._timers:
            timer.cancel()
        workers = [w for w in self._slots if w is not None] + list(self._retiring)
        for worker in workers:
            with _suppress_os_errors():
                worker.conn.send(("stop",))
        deadline = time.monotonic() + STOP_GRACE
        while any(w.process.is_alive() for w in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for worker in workers:
            self._forget(worker)
            if worker.job is not None and not worker.job.done():
                worker.job.set_exception(NotReadyError(f"model {self.name!r} shut down while this batch ran"))
        _stop_processes([w.process for w in workers])
        _live_backends.discard(self)
        self._model = None
        if self._freed is not None:
            self._freed.set()  # wake run() calls waiting for a worker: they fail

    def describe(self) -> dict[str, Any]:
        up = [w for w in self._slots if w is not None and w.up]
        return {
            "backend": "process",
            "workers": self.workers,
            "workers_up": len(up),
            "start_method": self.start_method,
            "devices": self.devices,
            "restarts": self.restarts,
            "pids": [w.process.pid for w in up],
            **self._model_facts,
        }

    def worker_pids(self) -> list[int]:
        """PIDs of the workers that are up, by slot."""
        return [w.process.pid for w in self._slots if w is not None and w.up]

    # ---------------------------------------------------------------- starting workers

    def _spawn(self, slot: int) -> None:
        """Start the worker of ``slot`` (on the loop's thread); it reports "ready" later."""
        if self._closed:
            return
        device = self.devices[slot % len(self.devices)]
        config = WorkerConfig(slot, device, threads_per_worker(self.workers, self.threads))
        front_end, worker_end = self._context.Pipe(duplex=True)
        forked = self.start_method == "fork"
        model = self._model if self._model is not None else self.spec
        limit = None
        if self.max_batches:
            limit = self.max_batches + random.randint(0, self.max_batches // 10)
        with _stderr_to_pipe() as pipe:
            real_stderr = InheritedFd(pipe[1]) if pipe is not None else None
            process = self._context.Process(  # type: ignore[attr-defined]  # each context has Process
                target=serve,
                args=(worker_end, config, model, forked, real_stderr),
                name=f"batchserve-{self.name}-{slot}",
                daemon=False,  # a daemon could not start processes of its own (data loaders...)
            )
            try:
                with _sigterm_blocked():
                    if forked:
                        gc.freeze()  # keep the parent's objects out of the children's collections
                        process.start()
                    else:
                        with environment(worker_env(device, slot, config.threads)):
                            process.start()
            except BaseException:
                if pipe is not None:
                    os.close(pipe[0])
                raise
        worker_end.close()
        worker = _Worker(slot, process, front_end, limit)
        if pipe is not None:
            worker.stderr = _StderrPipe(pipe[0])
            self._started_loop.add_reader(pipe[0], self._on_stderr, worker)
        self._slots[slot] = worker
        self._started_loop.add_reader(front_end.fileno(), self._on_message, worker)
        self._started_loop.add_reader(process.sentinel, self._on_exit, worker)
        # uvloop (libuv) makes a watched descriptor non-blocking; our pipe must block, or a
        # message larger than the socket buffer would be cut short.  We only read it when
        # readable, and the worker reads every message we send at once.
        os.set_blocking(front_end.fileno(), True)
        worker.start_timer = self._started_loop.call_later(self.start_timeout, self._start_timed_out, worker)
        log.info("worker %s/%d starting on %s (pid %d)", self.name, slot, device, process.pid)

    async def _wait_started(self) -> None:
        """Until every slot is up, or some are and the rest keep failing; raise if none can."""
        deadline = self._started_loop.time() + self.start_timeout
        while True:
            if self._start_error is not None:
                error, self._start_error = self._start_error, None
                await self.close()
                raise error
            up = self.capacity
            failing = sum(1 for count in self._failures if count >= NEVER_READY_TRIES)
            if up == self.workers or (up and up + failing >= self.workers):
                return
            if not up and not self._ever_ready and failing >= self.workers:
                error = WorkerDiedError(self._never_ready_message())
                await self.close()
                raise error
            if self._started_loop.time() > deadline:
                await self.close()
                raise NotReadyError(f"no worker of {self.name!r} started in {self.start_timeout:g} s")
            self._freed_event.clear()
            await wait_event(self._freed_event, 0.5)

    def _never_ready_message(self) -> str:
        message = (
            f"the workers of {self.name!r} died before they were ready, {NEVER_READY_TRIES} times each; "
            f"the last: {self._last_death}"
        )
        if "bootstrapping phase" in self._last_death:
            message += (
                f"\nA worker started with {self.start_method!r} imports your main script again: start the "
                'workers (a Streamer, a Batcher on a ProcessBackend) under if __name__ == "__main__":'
            )
        return message

    def _start_timed_out(self, worker: _Worker) -> None:
        if worker.state is State.STARTING:
            log.error("worker %s/%d not ready after %g s; killing it", self.name, worker.slot, self.start_timeout)
            with _suppress_os_errors():
                worker.process.kill()

    # ---------------------------------------------------------------- messages and deaths

    def _on_message(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._on_exit(worker)
            return
        except Exception as error:  # the whole message was read, but not unpickled
            message = ("error", f"outputs cannot be read back from the worker: {error}")
        self._handle(worker, message)

    def _handle(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            self._ever_ready = True
            if worker.start_timer is not None:
                worker.start_timer.cancel()
            self._failures[worker.slot] = 0
            self._set_idle(worker)
            self._capacity_changed()
            if isinstance(message[1], dict) and isinstance(message[1].get("model"), dict):
                self._model_facts = {"model": message[1]["model"]}
            log.info("worker %s/%d ready: %s", self.name, worker.slot, message[1])
        elif kind == "load_error":
            log.error("worker %s/%d failed to load the model: %s", self.name, worker.slot, message[1])
            if not self._started:
                self._start_error = ModelError(f"model {self.name!r} failed to load in a worker: {message[1]}")
                self._freed_event.set()
        elif kind in ("ok", "error"):
            job, worker.job = worker.job, None
            worker.batches += 1
            if job is not None and not job.done():
                job.set_result(message)
            if worker.limit is not None and worker.batches >= worker.limit:
                self._recycle(worker)
            else:
                self._set_idle(worker)

    def _on_exit(self, worker: _Worker) -> None:
        """The worker's process ended (or its pipe broke): settle its batch, maybe restart."""
        if worker.state is State.DEAD:
            return
        while worker.state is not State.DEAD and _poll(worker.conn):  # type: ignore[comparison-overlap]  # _handle changes it
            try:  # a reply written just before it died still counts
                self._handle(worker, worker.conn.recv())
            except (EOFError, OSError):
                break
        was_up, retiring = worker.up, worker.state is State.RETIRING
        self._forget(worker)
        worker.process.join(timeout=1)  # reap: no zombie
        if worker.job is not None and not worker.job.done():
            worker.job.set_exception(
                WorkerDiedError(f"worker process {worker.process.pid} {_exit_reason(worker.process)} running this batch")
            )
        worker.job = None
        if retiring:
            self._retiring.discard(worker)
            return
        if self._slots[worker.slot] is worker:
            self._slots[worker.slot] = None
        if was_up:
            self._capacity_changed()
        if self._closed:
            return
        self.restarts += 1
        if was_up:
            log.warning("worker %s/%d (pid %d) %s; restarting", self.name, worker.slot,
                        worker.process.pid, _exit_reason(worker.process))
            self._spawn(worker.slot)
            return
        self._failures[worker.slot] += 1
        last_words = worker.stderr.last_error() if worker.stderr is not None else ""
        self._last_death = f"worker {worker.slot} {_exit_reason(worker.process)}" + (
            f", saying:\n{last_words}" if last_words else " (it printed no error)"
        )
        delay = min(BACKOFF_FIRST * 2 ** (self._failures[worker.slot] - 1), BACKOFF_MAX)
        log.warning("worker %s/%d %s before it was ready; restarting in %.1f s", self.name,
                    worker.slot, _exit_reason(worker.process), delay)
        self._later(delay, self._spawn, worker.slot)
        if self._freed is not None:
            self._freed.set()  # _wait_started counts failures

    def _recycle(self, worker: _Worker) -> None:
        """Retire a worker that ran its share of batches; its replacement starts now."""
        log.info("recycling worker %s/%d after %d batches", self.name, worker.slot, worker.batches)
        worker.state = State.RETIRING
        self._retiring.add(worker)
        self._slots[worker.slot] = None
        self._capacity_changed()
        with _suppress_os_errors():
            worker.conn.send(("stop",))
        self._spawn(worker.slot)

    def _on_stderr(self, worker: _Worker) -> None:
        if worker.stderr is not None and not worker.stderr.read():
            self._stop_reading_stderr(worker)  # end of file: the worker is ready (or gone)

    def _stop_reading_stderr(self, worker: _Worker) -> None:
        """Take in what is left of the worker's stderr pipe, then close it (its tail stays)."""
        pipe = worker.stderr
        if pipe is None or pipe.closed:
            return
        if self._loop is not None:
            with _suppress_os_errors():
                self._loop.remove_reader(pipe.fd)
        while pipe.read(drain=True):
            pass
        pipe.close()

    def _forget(self, worker: _Worker) -> None:
        """Stop watching a worker and close our end of its pipe."""
        if worker.state is State.DEAD:
            return
        worker.state = State.DEAD
        self._stop_reading_stderr(worker)
        if worker.start_timer is not None:
            worker.start_timer.cancel()
        if self._loop is not None:
            with _suppress_os_errors():
                self._loop.remove_reader(worker.conn.fileno())
            with _suppress_os_errors():
                self._loop.remove_reader(worker.process.sentinel)
        worker.conn.close()

    # ---------------------------------------------------------------- free workers

    async def _acquire(self) -> _Worker:
        """An idle worker; waits while all are busy or restarting."""
        while True:
            if self._closed:
                raise NotReadyError(f"model {self.name!r} is shutting down")
            for worker in self._slots:
                if worker is not None and worker.state is State.IDLE:
                    return worker
            self._freed_event.clear()
            await self._freed_event.wait()

    def _set_idle(self, worker: _Worker) -> None:
        worker.state = State.IDLE
        self._freed_event.set()

    def _later(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        def fire() -> None:
            self._timers.discard(timer)
            callback(*args)

        timer = self._started_loop.call_later(delay, fire)
        self._timers.add(timer)


# --------------------------------------------------------------------------- helpers


def _default_start_method(devices: list[str]) -> str:
    if any(is_gpu(device) for device in devices):
        return "spawn"
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


#: held while this process's stderr is swapped for a starting worker's pipe, and while a
#: worker's output is passed on to it (never into another worker's pipe)
_stderr_lock = threading.Lock()


@contextlib.contextmanager
def _stderr_to_pipe() -> Iterator[tuple[int, int] | None]:
    """Within: file descriptor 2 is the write end of a new pipe, which a process started now
    takes as its stderr.  Yields ``(read end, a copy of the real stderr)``; None where there is
    no stderr to swap.

    The log handlers writing to stderr are held meanwhile: a line another thread logged in
    the swap would go into the worker's pipe, which nobody reads yet, and enough of them
    (llama.cpp's debug lines while the generation model loads) blocked that thread in its write
    holding the handler's lock, and the front with it (1 start in 5 under load)."""
    with _stderr_lock, _stderr_handlers_held():
        try:
            saved = os.dup(2)
        except OSError:
            yield None
            return
        read, write = os.pipe()
        for stream in (sys.stderr, sys.__stderr__):
            with _suppress_os_errors():
                if stream is not None:
                    stream.flush()  # what this process wrote before goes where it was meant to
        os.dup2(write, 2)
        os.close(write)
        try:
            yield read, saved
        finally:
            os.dup2(saved, 2)
            os.close(saved)  # a worker started meanwhile has its own copy


@contextlib.contextmanager
def _stderr_handlers_held() -> Iterator[None]:
    """Within: no other thread can log through a handler that writes to stderr."""
    known = logging.Logger.manager.loggerDict.values()
    loggers = [logging.getLogger(), *(logger for logger in known if isinstance(logger, logging.Logger))]
    handlers = {
        id(handler): handler for logger in loggers for handler in logger.handlers
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.__stderr__)
    }
    held = []
    try:
        for handler in handlers.values():
            handler.acquire()
            held.append(handler)
        yield
    finally:
        for handler in reversed(held):
            handler.release()


class _StderrPipe:
    """What a worker writes on stderr until it is ready: passed on to ours as it comes, the
    tail kept, so that a worker that dies first is reported with its own last words."""

    TAIL = 16_384

    def __init__(self, fd: int):
        self.fd = fd
        self.tail = bytearray()
        self.closed = False
        os.set_blocking(fd, False)

    def read(self, drain: bool = False) -> bool:
        """Read what is there and pass it on; False at end of file (or, with ``drain``,
        when nothing more is there now)."""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return not drain
        except OSError:
            return False
        if not chunk:
            return False
        self.tail += chunk
        del self.tail[: -self.TAIL]
        with _stderr_lock, _suppress_os_errors():
            view = memoryview(chunk)
            while view:
                view = view[os.write(2, view):]
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with _suppress_os_errors():
                os.close(self.fd)

    def last_error(self) -> str:
        """The exception that ended the worker (a traceback's last part), else its last line."""
        lines = self.tail.decode("utf-8", "replace").rstrip().splitlines()
        headers = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
        if not headers:
            return next((line.strip() for line in reversed(lines) if line.strip()), "")
        rest = lines[headers[-1] + 1 :]
        for index, line in enumerate(rest):
            if line and not line[0].isspace():  # past the frames (indented): the exception itself
                return "\n".join(rest[index:]).strip()
        return "\n".join(rest).strip()


def _poll(conn: Connection) -> bool:
    try:
        return conn.poll(0)
    except (EOFError, OSError):
        return False


def _exit_reason(process: Any) -> str:
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _stop_processes(processes: list[Any], grace: float = 2.0) -> None:
    """SIGKILL what is still alive (workers ignore SIGTERM) and reap everything."""
    for process in processes:
        if process.is_alive():
            with _suppress_os_errors():
                process.kill()
    for process in processes:
        process.join(timeout=grace)


@contextlib.contextmanager
def _sigterm_blocked() -> Iterator[None]:
    """SIGTERM blocked in this thread while a worker process is created: the worker inherits
    the mask (through fork, and through exec for spawn) and unblocks SIGTERM once it ignores
    it, so a SIGTERM sent to the process group while it starts cannot kill it.  This process
    gets a SIGTERM sent meanwhile when the mask is restored (or on another thread)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _suppress_os_errors:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> bool:
        return kind is not None and issubclass(kind, (OSError, ValueError, KeyError))


# Workers still running at interpreter exit are stopped (multiprocessing's own exit hook
# would otherwise wait forever for non-daemon children that wait for us).
_live_backends: "weakref.WeakSet[ProcessBackend]" = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    processes = []
    for backend in list(_live_backends):
        backend._closed = True
        processes += [w.process for w in backend._slots if w is not None]
        processes += [w.process for w in backend._retiring]
    _stop_processes([p for p in processes if p.pid is not None])
