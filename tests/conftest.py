"""Shared fixtures: the app in this process (``serve_app``, ``in_process``), and a real
`batchserve serve` process on a free loopback port where a process matters (``start_server``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import httpx
import pytest

from batchserve.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`batchserve serve ARGS` on loopback; stopped (and reaped) by the fixture.

    Its output (stderr with stdout) goes to a pipe, or to the file ``output`` when given: a
    server that writes much (``--log-level debug``) would fill a pipe no one reads, and block.
    """

    def __init__(self, *args: str, ready_timeout: float | None = 120.0, output: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = output
        # this checkout's src first: a worktree's server runs its own code, not an editable install's
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
        command = [sys.executable, "-m", "batchserve.cli", "serve", "--port", str(self.port), "--drain-seconds", "0", *args]
        sink = open(output, "wb") if output is not None else subprocess.PIPE  # noqa: SIM115  (the child holds it)
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        if output is not None:
            sink.close()
        if ready_timeout is not None:
            self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = (self.process.stdout.read() if self.process.stdout else self.output.read_bytes()).decode(errors="replace")
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{output}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("server not ready in time")

    def stop(self) -> None:
        terminate(self.process)
        if self.process.stdout:
            self.process.stdout.close()


def terminate(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def start_server():
    """Call with CLI args; every server started is stopped after the test."""
    servers: list[ServerProcess] = []

    def start(*args: str, **kwargs) -> ServerProcess:
        server = ServerProcess(*args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def generation_server():
    """One generation + infill server (bundled SmolLM2) shared by the generation and editor tests."""
    # one torch thread: on a CPU shared with other tests, spinning OpenMP threads slow it down many times
    server = ServerProcess(
        "--app", "generation", "--app", "infill", "--timeout", "120", "--generation-threads", "1", ready_timeout=300
    )
    yield server
    server.stop()


# --------------------------------------------------------------------------- in process


@contextlib.asynccontextmanager
async def in_process(
    settings: Settings | None = None, *, ready_timeout: float | None = 120.0, **options
) -> AsyncIterator[httpx.AsyncClient]:
    """The server's app, ``create_app(settings)``, in this process: its lifespan entered (the
    services start as under uvicorn) and an httpx client on its ASGI transport.  The same
    routes, error handlers and middleware (body limit, request metrics) as the real server,
    without a socket.  Settings, or flat options as the CLI takes them (``models=[...],
    max_batch_size=8``).  Waits until ``/readyz`` is 200 unless ``ready_timeout`` is None;
    on exit the client and every service are closed.
    """
    from batchserve.server.app import create_app

    if settings is None:
        settings = Settings.from_options(**options)
    elif options:
        raise TypeError("give Settings or options, not both")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if ready_timeout is not None:
                await wait_ready(client, ready_timeout)
            yield client


async def wait_ready(client: httpx.AsyncClient, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (ready := await client.get("/readyz")).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"app not ready in {timeout} s: {ready.text}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def serve_app():
    """Call (awaited) with Settings or CLI-style options: an httpx client on the app, in this
    process and ready (see :func:`in_process`); every app started is closed after the test.

    For tests on the default (per-test) event loop.  One app for a whole module: enter
    :func:`in_process` in a ``pytest_asyncio.fixture(scope="module", loop_scope="module")``
    and mark its tests ``pytest.mark.asyncio(loop_scope="module")`` (tests/apps/test_embeddings.py).
    """
    async with contextlib.AsyncExitStack() as stack:

        async def start(settings: Settings | None = None, **options) -> httpx.AsyncClient:
            return await stack.enter_async_context(in_process(settings, **options))

        yield start


@pytest.fixture
async def make_batcher():
    """Call like Batcher(...); every batcher made is closed after the test."""
    from batchserve import Batcher

    batchers = []

    def make(model, **options):
        batcher = Batcher(model, **options)
        batchers.append(batcher)
        return batcher

    yield make
    for batcher in batchers:
        await batcher.close()
