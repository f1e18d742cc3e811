"""Redis over TLS and with an ACL user, for real: a `redis-server` with a TLS port only and a
throwaway authority (tests/tls.py), fronts and workers on ``rediss://`` with
``--redis-ca-file`` (and a client certificate when Redis asks for one); ACL users restricted
to the commands the protocol needs (:data:`FRONT_COMMANDS`, :data:`WORKER_COMMANDS`).

What waiting cannot fix fails a front's or a worker's start at once, saying what to change:
``redis://`` to the TLS port (before: retried forever, as an outage), ``rediss://`` to a
plain port, a certificate not trusted, a missing client certificate, a command or keys the
ACL denies.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from batchserve.backends.redis.connection import (
    FRONT_COMMANDS,
    WORKER_COMMANDS,
    RedisSetupError,
    TLSFiles,
    acl_rules,
)
from batchserve.backends.redis.front import RedisBackend
from batchserve.backends.redis.worker import serve_batchers
from batchserve.backends.thread import ThreadBackend
from batchserve.batching import Batcher
from batchserve.model import ModelSpec
from tests.conftest import PYTHONPATH, ROOT, free_port
from tests.fakes import double
from tests.redis_fixtures import (  # noqa: F401 - fixtures
    RedisServer,
    WorkerProcess,
    front_args,
    needs_redis,
    redis_server,
    start_worker,
    wait_for_workers,
)
from tests.tls import pki  # noqa: F401 - fixture

pytestmark = needs_redis

ADMIN = "admin-secret"


def without(commands: tuple[str, ...], missing: str) -> tuple[str, ...]:
    return tuple(command for command in commands if command != missing)


USERS = (
    f"front on >front-pw {acl_rules(FRONT_COMMANDS)}",
    f"worker on >worker-pw {acl_rules(WORKER_COMMANDS)}",
    f"front-no-xadd on >pw {acl_rules(without(FRONT_COMMANDS, 'xadd'))}",
    f"worker-no-xack on >pw {acl_rules(without(WORKER_COMMANDS, 'xack'))}",
    f"worker-no-hset on >pw {acl_rules(without(WORKER_COMMANDS, 'hset'))}",
    f"elsewhere on >pw {acl_rules(WORKER_COMMANDS, prefix='other')}",
)


@pytest.fixture
def tls_redis(pki):
    """TLS only, asking every client for a certificate the test authority signed."""
    server = RedisServer(tls=pki, client_certificates=True)
    yield server
    server.stop()


@pytest.fixture
def acl_redis():
    server = RedisServer(password=ADMIN, users=USERS)
    yield server
    server.stop()


def start_front(url: str, tls: TLSFiles | None = None, name: str = "double") -> RedisBackend:
    """A front (not started) whose batches wait for a worker rather than fail while none is up."""
    return RedisBackend(url, name, tls=tls, wait_for_workers=True)


async def refused_start(url: str, tls: TLSFiles | None = None) -> str:
    """A front's start on ``url``: it must fail, at once, with a RedisSetupError; its message."""
    front = start_front(url, tls)
    started = time.monotonic()
    try:
        with pytest.raises(RedisSetupError) as refused:
            await asyncio.wait_for(front.start(), 10)
    finally:
        await front.close()
    assert time.monotonic() - started < 5, "refused at once, not after retrying"
    return str(refused.value)


def run_worker_until_it_exits(*args: str, timeout: float = 90) -> tuple[int, str]:
    worker = WorkerProcess(*args)
    try:
        worker.process.wait(timeout=timeout)
    finally:
        output = worker.stop()
    return worker.process.returncode, output


# --------------------------------------------------------------------------- TLS


def test_front_and_worker_over_tls_with_a_client_certificate(tls_redis, start_worker, start_server):
    url = tls_redis.url()
    assert url.startswith("rediss://")
    start_worker("--redis-url", url, "--model", "tests.fakes:double", *tls_redis.tls_args())
    front = start_server(*front_args(url, "tests.fakes:double", *tls_redis.tls_args()))
    wait_for_workers(tls_redis.client(), "double", 1, timeout=60)
    answer = httpx.post(f"{front.url}/models/double/predict", json={"inputs": [1, 2]}, timeout=30)
    assert answer.status_code == 200 and answer.json() == {"outputs": [2, 4]}
    ready = httpx.get(f"{front.url}/readyz", timeout=10).json()
    assert "rediss://localhost" in str(ready)


async def test_a_plain_url_to_the_tls_port_fails_at_once_saying_so(tls_redis):
    plain = tls_redis.url().replace("rediss://", "redis://")
    message = await refused_start(plain)
    assert "the server speaks TLS: use rediss://" in message and "--redis-ca-file" in message


def test_a_worker_and_a_server_on_a_plain_url_to_the_tls_port_exit_saying_so(tls_redis):
    plain = tls_redis.url().replace("rediss://", "redis://")
    status, output = run_worker_until_it_exits("--redis-url", plain, "--model", "tests.fakes:double")
    assert status == 2 and "the server speaks TLS: use rediss://" in output, output
    assert "Traceback" not in output
    served = subprocess.run(
        [sys.executable, "-m", "batchserve.cli", "serve", "--port", str(free_port()), *front_args(plain, "tests.fakes:double")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1"},
    )
    assert served.returncode == 3, served.stderr
    assert "the server speaks TLS: use rediss://" in served.stderr and "Traceback" not in served.stderr


async def test_certificate_problems_are_named(tls_redis, pki, redis_server):
    url = tls_redis.url()
    untrusted = await refused_start(url)
    assert "certificate is not trusted" in untrusted and "give the authority" in untrusted and "--redis-ca-file" in untrusted
    other = await refused_start(url, TLSFiles(ca_file=str(pki.other_ca)))
    assert f"not signed by --redis-ca-file {pki.other_ca}" in other
    no_client_certificate = await refused_start(url, TLSFiles(ca_file=str(pki.ca)))
    assert "asks for a client certificate" in no_client_certificate and "--redis-certfile" in no_client_certificate
    to_a_plain_port = await refused_start(redis_server.url().replace("redis://", "rediss://"), TLSFiles(ca_file=str(pki.ca)))
    assert "does not speak TLS on this port: use redis://" in to_a_plain_port


def test_files_that_cannot_work_are_refused_when_the_front_is_made(pki, tmp_path):
    with pytest.raises(RedisSetupError, match=r"--redis-ca-file need a rediss:// \(TLS\) URL"):
        start_front("redis://localhost:6379/0", TLSFiles(ca_file=str(pki.ca)))
    with pytest.raises(RedisSetupError, match="--redis-keyfile needs --redis-certfile"):
        start_front("rediss://localhost:6379/0", TLSFiles(keyfile=str(pki.client_key)))
    with pytest.raises(RedisSetupError, match=f"--redis-ca-file {tmp_path}/nope.pem: no such file"):
        start_front("rediss://localhost:6379/0", TLSFiles(ca_file=str(tmp_path / "nope.pem")))


async def test_a_worker_in_process_serves_a_front_over_tls(tls_redis, pki):
    """The library path (compat's RedisWorker uses it): serve_batchers with the TLS files."""
    tls = TLSFiles(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    stop = asyncio.Event()
    batcher = Batcher(ThreadBackend(ModelSpec(double)), max_batch_size=8, max_latency=0.001, name="double")
    serving = asyncio.create_task(serve_batchers({"double": batcher}, tls_redis.url(), stop=stop, tls=tls))
    front = Batcher(start_front(tls_redis.url(), tls), max_batch_size=8, max_latency=0.001, name="double")
    await front.start()
    try:
        assert await front.submit([3, 4], timeout=20) == [6, 8]
    finally:
        await front.close()
        stop.set()
        await asyncio.wait_for(serving, 20)


# --------------------------------------------------------------------------- ACL


def test_acl_users_with_only_the_protocols_commands_serve_end_to_end(acl_redis, start_worker, start_server):
    """Every command a front and a worker send, in every path (serving, the lease, reclaiming,
    forgetting stale consumers, leaving), is in their lists: Redis logs no denial."""
    front_url, worker_url = acl_redis.url(user="front", password="front-pw"), acl_redis.url(user="worker", password="worker-pw")
    worker = start_worker("--redis-url", worker_url, "--model", "tests.fakes:double", "--visibility-timeout", "0.3")
    front = start_server(*front_args(front_url, "tests.fakes:double"))
    admin = acl_redis.client()
    wait_for_workers(admin, "double", 1, timeout=60)
    for value in range(20):
        answer = httpx.post(f"{front.url}/models/double/predict", json={"inputs": [value]}, timeout=30)
        assert answer.json() == {"outputs": [2 * value]}
    time.sleep(3.5)  # 35 upkeep rounds of 0.1 s: stale consumers are looked for every 30th
    output = worker.stop()
    denied = [entry for entry in admin.acl_log() if entry["object"] != "client|setinfo"]  # redis-py's, ignored
    assert denied == [], denied
    assert "NOPERM" not in output and "refused" not in output, output
    assert admin.zcard("batchserve::double:workers") == 0, "the worker left (ZREM) when stopped"


async def test_a_front_user_missing_a_command_fails_at_start_naming_it(acl_redis):
    message = await refused_start(acl_redis.url(user="front-no-xadd", password="pw"))
    assert "Redis user 'front-no-xadd'" in message and "may not run xadd, which a front needs" in message
    assert "ACL SETUSER front-no-xadd +xadd" in message and "pw@" not in message


@pytest.mark.parametrize("user, missing", [("worker-no-xack", "xack"), ("worker-no-hset", "hset")])
def test_a_worker_user_missing_a_command_exits_naming_it(acl_redis, user, missing):
    status, output = run_worker_until_it_exits("--redis-url", acl_redis.url(user=user, password="pw"), "--model", "tests.fakes:double")
    assert status == 2, output
    assert f"may not run {missing}, which a worker needs" in output and f"ACL SETUSER {user} +{missing}" in output, output
    assert "Traceback" not in output


def test_a_worker_user_of_other_keys_exits_naming_them(acl_redis):
    url = acl_redis.url(user="elsewhere", password="pw")
    status, output = run_worker_until_it_exits("--redis-url", url, "--model", "tests.fakes:double")
    assert status == 2 and "may not use the keys batchserve::double:*" in output, output


def test_the_documented_acl_lines_are_the_protocols():
    """docs/scaling.md's ACL SETUSER lines grant exactly the commands the code sends."""
    page = (ROOT / "docs" / "scaling.md").read_text()
    lines = {match.group(1): match.group(2) for match in re.finditer(r"ACL SETUSER (batchserve-\w+) on >\S+ (.+)", page)}
    assert lines == {
        "batchserve-front": acl_rules(FRONT_COMMANDS),
        "batchserve-worker": acl_rules(WORKER_COMMANDS),
    }
