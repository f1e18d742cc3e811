"""A real ``redis-server`` on a free port, and ``batchserve worker`` processes, for tests.

Import the fixtures into a test module: ``from tests.redis_fixtures import redis_server, start_worker``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import redis

from tests.conftest import ROOT, free_port, terminate

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (make system-deps)")


class RedisServer:
    """``redis-server`` on loopback, no persistence; stop() and start() again on the same port."""

    def __init__(self, password: str | None = None):
        self.port = free_port()
        self.password = password
        self.process: subprocess.Popen | None = None
        self.start()

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db), socket_timeout=5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


class WorkerProcess:
    """``batchserve worker ARGS``; stopped (and reaped) by the fixture."""

    def __init__(self, *args: str):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "batchserve.cli", "worker", *args]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> str:
        """Stop the worker (again: no-op); return what it printed."""
        terminate(self.process)
        if self.output is None:
            self.output = self.process.stdout.read().decode(errors="replace")
            self.process.stdout.close()
        return self.output


def wait_for_workers(client: redis.Redis, model: str, count: int, prefix: str = "", timeout: float = 120.0) -> None:
    """Wait until ``count`` workers serve ``model`` (they announce themselves once loaded)."""
    key = f"batchserve:{prefix}:{model}:workers"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.zcount(key, time.time(), "+inf") >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{count} workers did not come up for {model!r} (prefix {prefix!r})")


def front_args(url: str, model: str, *extra: str) -> tuple[str, ...]:
    """`batchserve serve` args for a front that sends ``model``'s batches through Redis at ``url``."""
    return ("--backend", "redis", "--redis-url", url, "--model", model, "--drain-seconds", "0", *extra)


async def load(url: str, count: int, concurrency: int, when_answered: dict) -> list[tuple[int, int, object]]:
    """POST `count` requests, `concurrency` at a time; call when_answered[n]() after n answers."""
    results: list[tuple[int, int, object]] = []
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(index: int) -> None:
            async with gate:
                response = await client.post(url, json={"inputs": [index]})
            results.append((index, response.status_code, response.json()))
            action = when_answered.get(len(results))
            if action is not None:
                action()

        await asyncio.gather(*(one(index) for index in range(count)))
    return results


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def password_redis():
    server = RedisServer(password="s3cret")
    yield server
    server.stop()


@pytest.fixture
def start_worker():
    """Call with `batchserve worker` args; every worker started is stopped after the test."""
    workers: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        worker = WorkerProcess(*args)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
