"""A batch job: every line of a file through the apps' own routes, in this process.

The job builds the server's app as ``serve`` would (:func:`batchserve.server.app.create_app`,
the same settings and config file; no metrics, docs, API keys, TLS or CORS: there is no network)
and calls it once per line as an ASGI application (:class:`LocalApp`: no socket, no HTTP
parsing), so each line gets exactly what the route answers a client: its validation, its
status, its error message.  A well-formed line for one of the apps' JSON routes skips the
middleware and the router and calls the route itself (the same validation and endpoint, the
app's own error handlers): on 2 cores the job's front shares the CPU with the model, and this
ran about 8 % more lines (docs/batch.md).

The input is read twice, line by line: a first pass counts the lines still to run and refuses
custom_ids given twice before anything runs (:func:`batchserve.batchjob.lines.scan_input`); the
second reads a window of lines at a time, sorts it by length (similar lengths batch with less
padding; not for a model that does not pad rows) and keeps at most ``in_flight`` requests in the
batchers. Each answer is appended to its file and flushed as it finishes; lines an earlier run
wrote are skipped (:func:`~batchserve.batchjob.lines.read_done`). A 503 or 429 (a full queue, no
Redis worker yet) is tried again, with growing pauses, until the request's deadline; it is the
job's own pressure, not the line's fault.

SIGINT or SIGTERM stops taking lines; what is in flight finishes and is written, then the job
exits with 128 + the signal's number.  A second signal stops at once (nothing half-written).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from batchserve.batchjob.lines import (
    Done,
    LineError,
    OutputError,
    Request,
    answer_line,
    error_line,
    input_lines,
    json_body,
    open_appending,
    parse_line,
    read_done,
    scan_input,
)
from batchserve.batchjob.progress import Counts, Progress
from batchserve.priority import offline
from batchserve.settings import BackendKind, Settings

#: exit status of a job that could not start its models (serve's own: batchserve.server.app.CANNOT_SERVE)
CANNOT_RUN = 3
#: a refused job (files, duplicates): nothing ran
REFUSED = 2


class JobError(Exception):
    """The job cannot run (``status`` is its exit status); the message says why."""

    def __init__(self, message: str, status: int = REFUSED):
        super().__init__(message)
        self.status = status


@dataclass
class JobOptions:
    input: Path
    output: Path
    errors: Path
    window: int = 1024
    in_flight: int = 256
    quiet: bool = False
    log_every: float = 10.0


def errors_path(output: Path) -> Path:
    """Where error lines go by default: ``OUT.jsonl`` → ``OUT.errors.jsonl``."""
    name = output.name.removesuffix(".jsonl")
    return output.with_name(f"{name}.errors.jsonl")


def job_settings(settings: Settings) -> Settings:
    """``settings`` for a job in this process: one process, nothing served to a network, and
    with no ``--backend`` given, every model on a thread of this process (``serve``'s automatic
    layout gives the embeddings one worker process per core on a CPU: for a job, whose front
    has little to do, a thread with every core ran 10-15 % more lines, docs/batch.md)."""
    server = settings.server.model_copy(update={
        "http_workers": 1, "metrics": False, "docs": False, "api_keys": [], "api_key_file": None,
        "ssl_certfile": None, "ssl_keyfile": None, "ssl_ca_certs": None, "cors_origins": [], "batch_api": False,
    })
    backend = settings.backend if settings.backend is not None else BackendKind.thread
    return settings.model_copy(update={"server": server, "backend": backend})


# --------------------------------------------------------------------------- the app, in process


#: a scope key set on the requests a job makes in a server's own process (the Batch API): the
#: API key was checked when the batch was created (:mod:`batchserve.server.auth`)
INTERNAL_SCOPE = "batchserve.internal"


class LocalApp:
    """An ASGI application called in this process: one POST, its status, content type and body.
    ``scope``: keys added to each request's scope.

    A request for a route that can be called directly (``call_json``: the apps' JSON routes,
    :class:`batchserve.server.json_route.JSONBodyRoute`) skips the middleware and the router:
    the route validates the body and calls its endpoint, and an exception the endpoint raises
    is answered by the app's own handler for it.  Every other request, a body the route does not
    take as is (it does not validate, or is over ``max_body_bytes``) among them, goes through the
    whole app, so every answer is the one a client gets."""

    def __init__(self, app: Any, scope: dict[str, Any] | None = None, max_body_bytes: int | None = None):
        self.app = app
        self.scope = scope or {}
        self.max_body_bytes = max_body_bytes
        self.direct: dict[str, tuple[Callable, dict[str, str]] | None] = {}
        services = getattr(getattr(app, "state", None), "services", None) or []
        #: routes whose lines a job keeps in the file's order: their model does not pad rows
        #: (:attr:`batchserve.apps.base.Service.pads_rows`), so sorting saves nothing there
        self.in_file_order = frozenset(
            route.path for service in services if not service.pads_rows
            for route in service.router.routes if hasattr(route, "path")
        )

    async def post(self, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, str, bytes]:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
            "client": ("run-batch", 0), "server": ("run-batch", 0), **self.scope,
        }
        exchange = _Exchange(body)
        try:
            response = await self._call_directly(scope, body)
            if response is not None:
                await response(scope, exchange.receive, exchange.send)
            else:
                await self.app(scope, exchange.receive, exchange.send)
        except Exception as error:  # the app answered 500 first (Starlette's ServerErrorMiddleware) or nothing
            if not exchange.status:
                return 500, "application/json", _error_body(f"{type(error).__name__}: {error}")
        finally:
            exchange.finished.set()
        return exchange.status, exchange.content_type, b"".join(exchange.chunks)

    async def _call_directly(self, scope: dict[str, Any], body: bytes) -> Any:
        """The route's Response to a request it can take without the app, else None."""
        if self.max_body_bytes is not None and len(body) > self.max_body_bytes:
            return None
        path = scope["path"]
        if path not in self.direct:
            self.direct[path] = self._route(scope)
        found = self.direct[path]
        if found is None:
            return None
        call, path_params = found
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            return await call(body, path_params, headers.get)
        except Exception as error:
            handler = _handler_for(self.app, error)
            if handler is None:
                raise
            from starlette.requests import Request

            return await handler(Request({**scope, "app": self.app, "path_params": path_params}), error)

    def _route(self, scope: dict[str, Any]) -> tuple[Callable, dict[str, str]] | None:
        """The direct call of the route the app's router gives ``scope``, with its path parameters."""
        return _direct_route(getattr(getattr(self.app, "router", None), "routes", ()), scope)


def _direct_route(routes: Iterable[Any], scope: dict[str, Any]) -> tuple[Callable, dict[str, str]] | None:
    """The first route of ``routes`` that matches ``scope`` in full, looked for as a router does
    (inside included routers: FastAPI keeps them whole), if it can be called directly."""
    from starlette.routing import Match

    for route in routes:
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        included = getattr(getattr(route, "original_router", None), "routes", None)
        if included is not None:
            found = _direct_route(included, scope)
            if found is not None:
                return found
        call = getattr(route, "call_json", None)
        if match is Match.FULL and call is not None:
            return call, child.get("path_params", {})
        return None  # another kind of route, or the wrong method: the app answers
    return None


def _handler_for(app: Any, error: Exception) -> Callable | None:
    """The app's exception handler for ``error`` (the nearest class in its MRO), as Starlette looks it up."""
    handlers = getattr(app, "exception_handlers", {})
    for kind in type(error).__mro__:
        if kind in handlers:
            return handlers[kind]
    return None


class _Exchange:
    """One request's ASGI receive and send: the body in, the status, content type and body out."""

    def __init__(self, body: bytes):
        self.body = body
        self.given = False
        self.finished = asyncio.Event()
        self.status, self.content_type, self.chunks = 0, "", []

    async def receive(self) -> dict:
        if not self.given:
            self.given = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.finished.wait()  # the client stays until the answer is complete
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            for name, value in message.get("headers", ()):
                if name.lower() == b"content-type":
                    self.content_type = value.decode("latin-1")
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                self.finished.set()


def _error_body(message: str) -> bytes:
    import orjson

    return orjson.dumps({"error": {"message": message, "type": "server_error"}})


# --------------------------------------------------------------------------- the job


class Job:
    """Runs requests through a :class:`LocalApp`, writing each answer as it finishes."""

    #: pauses between tries of a request refused for the job's own pressure (503, 429), seconds
    FIRST_PAUSE, LONGEST_PAUSE = 0.05, 2.0

    def __init__(self, app: LocalApp, options: JobOptions, counts: Counts, progress: Progress, deadline: float):
        self.app = app
        self.options = options
        self.counts = counts
        self.progress = progress
        self.deadline = deadline
        self.headers = [(b"content-type", b"application/json"), (b"x-request-timeout", f"{deadline:g}".encode())]
        self.stopping: str | None = None
        self.tasks: set[asyncio.Task] = set()
        self.out: BinaryIO | None = None
        self.err: BinaryIO | None = None

    def stop(self, reason: str) -> None:
        """The first call stops taking lines; a second cancels what is in flight."""
        if self.stopping is None:
            self.stopping = reason
            if not self.options.quiet:
                self.progress.echo(f"run-batch: {reason}: finishing the {len(self.tasks)} requests in flight (again to stop now)")
            return
        for task in list(self.tasks):
            task.cancel()

    async def run(self, lines: Iterable[tuple[int, bytes]], done: Done) -> None:
        options = self.options
        # every request a job makes is offline work: online requests are served first (docs/batch.md)
        with offline(), open_appending(options.output) as self.out, open_appending(options.errors) as self.err:
            slots = asyncio.Semaphore(options.in_flight)
            ticker = asyncio.create_task(self._tick())
            try:
                for window in self._windows(lines, done):
                    for request in window:
                        await slots.acquire()
                        if self.stopping:
                            break
                        task = asyncio.create_task(self._run_one(request))
                        self.tasks.add(task)
                        task.add_done_callback(lambda task: (self.tasks.discard(task), slots.release()))
                    if self.stopping:
                        break
                await asyncio.gather(*self.tasks, return_exceptions=True)
            finally:
                ticker.cancel()

    def _windows(self, lines: Iterable[tuple[int, bytes]], done: Done) -> Iterator[list[Request]]:
        """Windows of requests still to run, each sorted by length; lines that cannot run are
        written to the error file on the way."""
        window: list[Request] = []
        for number, raw in lines:
            if self.stopping:
                return
            try:
                request = parse_line(raw, number)
            except LineError as error:
                if not done.has(error.custom_id, number):
                    self._write(self.err, error_line(error), ok=False)
                continue
            if request.custom_id in done.ids:
                continue
            window.append(request)
            if len(window) >= self.options.window:
                yield sorted(window, key=self._order)
                window = []
        if window:
            yield sorted(window, key=self._order)

    def _order(self, request: Request) -> int:
        """A window's order: by length (similar lengths batch with less padding), but the file's
        (a stable sort) for a route whose model does not pad rows (generation on llama.cpp ran
        about 5 % faster so: docs/batch.md)."""
        return 0 if request.url in self.app.in_file_order else request.size

    async def _run_one(self, request: Request) -> None:
        pause, waited = self.FIRST_PAUSE, 0.0
        while True:
            status, content_type, body = await self.app.post(request.url, request.body, self.headers)
            if status not in (429, 503) or waited >= self.deadline:
                break
            if self.stopping:
                return  # not answered: the next run does it
            await asyncio.sleep(pause)
            waited += pause
            pause = min(2 * pause, self.LONGEST_PAUSE)
        ok = 200 <= status < 300
        self._write(self.out if ok else self.err, answer_line(request.custom_id, status, json_body(body, content_type)), ok)

    def _write(self, file: BinaryIO | None, line: bytes, ok: bool) -> None:
        assert file is not None
        file.write(line)
        file.flush()
        if ok:
            self.counts.answered += 1
        else:
            self.counts.errors += 1
        self.progress.advance()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.progress.every))
            self.progress.tick()


# --------------------------------------------------------------------------- the whole command


def prepare(options: JobOptions) -> tuple[Done, Counts]:
    """What earlier runs did and what is left to run; :class:`JobError` when the job is refused."""
    if not options.input.is_file():
        raise JobError(f"no input file {options.input}")
    paths = {options.input.resolve(), options.output.resolve(), options.errors.resolve()}
    if len(paths) < 3:
        raise JobError("the input, output and error files must be three different files")
    done = Done()
    try:
        read_done(options.output, done)
        read_done(options.errors, done)
    except OutputError as error:
        raise JobError(str(error)) from None
    scan = scan_input(options.input, done)
    if scan.duplicates:
        raise JobError(f"{options.input}: {scan.duplicates_message()}; nothing was run")
    return done, Counts(total=scan.to_run, before=scan.lines - scan.to_run)


def run_job(settings: Settings, options: JobOptions, create_app: Callable[[Settings], Any]) -> int:
    """Run the job through the app ``create_app(settings)`` builds (the server's,
    :func:`batchserve.server.app.create_app`); its exit status (0: every line answered or reported)."""
    done, counts = prepare(options)
    progress = Progress(counts, quiet=options.quiet, every=options.log_every)
    if counts.total == 0:
        if not options.quiet:
            progress.echo(f"run-batch: nothing to run: the {counts.before} lines of {options.input} are in the output already")
        return 0
    return asyncio.run(_run(create_app(job_settings(settings)), settings.server.grace, options, done, counts, progress))


async def _run(application: Any, grace: float, options: JobOptions, done: Done, counts: Counts, progress: Progress) -> int:
    services = application.state.services
    settings = application.state.settings
    local = LocalApp(application, max_body_bytes=settings.server.max_body_bytes)
    job = Job(local, options, counts, progress, deadline=settings.batching.max_timeout)
    loop = asyncio.get_running_loop()
    signals = {signal.SIGINT: "interrupted (SIGINT)", signal.SIGTERM: "stopped (SIGTERM)"}
    try:
        for number, reason in signals.items():  # before the models load: a Ctrl-C then runs no line
            loop.add_signal_handler(number, job.stop, reason)
        started = await asyncio.gather(*(service.start() for service in services), return_exceptions=True)
        failed = [f"{s.name}: {type(e).__name__}: {e}" for s, e in zip(services, started) if isinstance(e, BaseException)]
        if failed:
            raise JobError(f"cannot run: {'; '.join(failed)}", CANNOT_RUN)
        _restart_clock(counts)
        progress.start()
        try:
            await job.run(input_lines(options.input), done)
        finally:
            progress.stop()
    finally:
        for number in signals:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(number)
        await asyncio.gather(*(s.close(grace) for s in services), return_exceptions=True)
    if not options.quiet:
        progress.echo(progress.summary(str(options.output), str(options.errors), job.stopping))
    if job.stopping:
        number = next(n for n, reason in signals.items() if reason == job.stopping)
        return 128 + int(number)
    return 0


def _restart_clock(counts: Counts) -> None:
    """The rate counts from the first line run, not from the models' load."""
    import time

    counts.started = time.monotonic()
