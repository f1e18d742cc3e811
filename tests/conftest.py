"""Shared fixtures: a real `batchserve serve` process on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`batchserve serve ARGS` on loopback; stopped (and reaped) by the fixture."""

    def __init__(self, *args: str, ready_timeout: float | None = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "batchserve.cli", "serve", "--port", str(self.port), "--drain-seconds", "0", *args]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if ready_timeout is not None:
            self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode(errors="replace")
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


@pytest.fixture(scope="module")
def embeddings_server():
    """One embeddings server shared by a test module."""
    server = ServerProcess("--app", "embeddings")
    yield server
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
