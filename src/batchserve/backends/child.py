"""What runs inside one worker process of the process backend.

The front process and a worker talk over one duplex pipe (a Unix socket pair), each message
a tuple pickled by :mod:`multiprocessing.connection` — both ends are this package, on one
machine, so pickle is safe here (the Redis backend, which crosses machines, never uses it).

front → worker: ``("batch", items)`` · ``("stop",)``
worker → front: ``("ready", info)`` · ``("load_error", message)`` · ``("ok", outputs)`` ·
``("error", message)``

A worker exits when told to stop, or when the front's end of the pipe closes (the front
died), so no worker outlives its server.  It ignores SIGTERM: a SIGTERM sent to the whole
process group (systemd's default KillMode, ``timeout``, a container runtime) is its front's
to act on; the front drains, stops its workers itself, and meanwhile they keep computing.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

from batchserve.backends.base import model_facts
from batchserve.devices import set_torch_threads, worker_env
from batchserve.model import Model, ModelSpec


@dataclass(frozen=True)
class WorkerConfig:
    """Where and how one worker runs."""

    slot: int
    device: str
    threads: int


def serve(
    conn: Connection, config: WorkerConfig, model: Model | ModelSpec, forked: bool, stderr: InheritedFd | None = None
) -> None:
    """Entry point of a worker process: set up, load (unless forked with a loaded model), serve.

    Until it is ready, the worker's stderr is a pipe the front reads (and passes on), so that
    a worker dying before it was ready is reported with its own last words; ``stderr`` is the
    real one, put back when it is ready."""
    _become_worker(conn, config, forked)
    if isinstance(model, ModelSpec):
        try:
            model = model.build()
            model.load()
        except BaseException as error:  # noqa: BLE001 - every failure must reach the front
            _send(conn, ("load_error", f"{type(error).__name__}: {error}"))
            sys.exit(3)
    set_torch_threads(config.threads)  # torch may have been imported while loading
    info = {"pid": os.getpid(), "device": config.device, "threads": config.threads, **model_facts(model)}
    if stderr is not None:
        _restore_stderr(stderr.fd)
    if _send(conn, ("ready", info)):
        _serve_batches(conn, model)


def _serve_batches(conn: Connection, model: Model) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the front went away
        if message[0] != "batch":
            return  # "stop"
        reply: tuple[str, Any]
        try:
            reply = ("ok", model.predict(message[1]))
        except Exception as error:  # noqa: BLE001 - the front isolates the failing items
            reply = ("error", f"{type(error).__name__}: {error}")
        if not _send(conn, reply):
            return


def _send(conn: Connection, message: tuple[Any, ...]) -> bool:
    """Send a message; False when the front is gone.  Unpicklable outputs become an error."""
    try:
        conn.send(message)
    except OSError:  # BrokenPipeError, ConnectionResetError: the front is gone
        return False
    except Exception as error:  # noqa: BLE001 - pickling failed before anything was written
        return _send(conn, ("error", f"outputs cannot be sent back from the worker: {error}"))
    return True


class InheritedFd:
    """A file descriptor of the front that a worker process gets too (same number after fork;
    passed along, like the pipe's own end, when pickled for a spawned worker)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self) -> tuple[Callable[[Any], InheritedFd], tuple[Any]]:
        from multiprocessing.reduction import DupFd

        return _inherited_fd, (DupFd(self.fd),)


def _inherited_fd(duplicate: Any) -> InheritedFd:
    return InheritedFd(duplicate.detach())


def _restore_stderr(fd: int) -> None:
    """Point stderr (and Python's ``sys.stderr``) back at the front's real stderr."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    try:
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        pass


def _become_worker(conn: Connection, config: WorkerConfig, forked: bool) -> None:
    """Signals, environment, threads and inherited sockets of a fresh worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is for the front, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so is a SIGTERM to the whole process group
    # the front blocked SIGTERM while starting us (a signal sent meanwhile is dropped now)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    signal.set_wakeup_fd(-1)
    os.environ.update(worker_env(config.device, config.slot, config.threads))
    set_torch_threads(config.threads)
    if forked:
        _release_inherited_sockets(keep=conn.fileno())


def _release_inherited_sockets(keep: int) -> None:
    """Point every socket inherited through fork, but our own pipe, at /dev/null.

    A forked worker holds copies of the server's listening socket, its event loop's wakeup
    socket and the other workers' pipes.  Kept open, they would stop the front from seeing
    a worker die (its pipe never reaches end-of-file) and keep the port bound after the
    server exits.  ``dup2`` keeps the descriptor numbers taken, so objects inherited from
    the parent can never close an unrelated file that later reused the number.
    """
    try:
        descriptors = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in descriptors:
            if fd in (0, 1, 2, keep, null):
                continue
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.dup2(null, fd)
            except OSError:
                continue
    finally:
        os.close(null)
