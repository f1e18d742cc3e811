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
from typing import TYPE_CHECKING

import httpx
import pytest
import redis

from tests.conftest import PYTHONPATH, ROOT, free_port, terminate

if TYPE_CHECKING:
    from tests.tls import Pki

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (make system-deps)")


class RedisServer:
    """``redis-server`` on loopback, no persistence; stop() and start() again on the same port.

    With ``tls`` (a :class:`~tests.tls.Pki`) it speaks TLS only, with the authority's server
    certificate, and asks clients for a certificate that authority signed when
    ``client_certificates``; ``users`` are ``ACL SETUSER`` lines (``name on >password rules``).
    :meth:`client` is the default user's (an admin), over TLS when the server speaks it."""

    def __init__(
        self, password: str | None = None, tls: Pki | None = None, client_certificates: bool = False,
        users: tuple[str, ...] = (),
    ):
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.client_certificates = client_certificates
        self.users = users
        self.process: subprocess.Popen | None = None
        self.start()

    def url(self, db: int = 0, user: str | None = None, password: str | None = None) -> str:
        """The URL of the default user (``user`` and ``password`` for another)."""
        password = password if user else self.password
        auth = f"{user or ''}:{password}@" if password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{'localhost' if self.tls else '127.0.0.1'}:{self.port}/{db}"

    def tls_args(self, client_certificate: bool | None = None) -> tuple[str, ...]:
        """The worker's and front's options to reach this server: the authority, and (by
        default when the server asks for one) the client certificate."""
        if self.tls is None:
            return ()
        args = ("--redis-ca-file", str(self.tls.ca))
        if self.client_certificates if client_certificate is None else client_certificate:
            args += ("--redis-certfile", str(self.tls.client_cert), "--redis-keyfile", str(self.tls.client_key))
        return args

    def start(self) -> None:
        plain_port = 0 if self.tls is not None else self.port  # 0: no plain-text port at all
        command = [REDIS_SERVER, "--port", str(plain_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        if self.tls is not None:
            command += [
                "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.server_cert),
                "--tls-key-file", str(self.tls.server_key), "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "yes" if self.client_certificates else "no",
            ]
        for user in self.users:
            command += ["--user", *user.split()]
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
        options = {}
        if self.tls is not None:
            options = {"ssl_ca_certs": str(self.tls.ca)}
            if self.client_certificates:
                options.update(ssl_certfile=str(self.tls.client_cert), ssl_keyfile=str(self.tls.client_key))
        return redis.Redis.from_url(self.url(db), socket_timeout=5, **options)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


class WorkerProcess:
    """``batchserve worker ARGS``; stopped (and reaped) by the fixture."""

    def __init__(self, *args: str):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": PYTHONPATH}
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
