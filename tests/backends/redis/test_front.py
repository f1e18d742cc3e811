"""Redis backend end to end: a real redis-server, `batchserve worker` processes, an HTTP front.

Worker death under load, a Redis outage, a password-protected Redis, and hostile entries.
The worker's own side (SIGTERM, credentials, entry parsing) is in tests/backends/redis/test_worker.py.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time

import httpx

from batchserve import wire
from tests.redis_fixtures import (  # noqa: F401 - fixtures
    WorkerProcess,
    front_args,
    load,
    needs_redis,
    password_redis,
    redis_server,
    start_worker,
    wait_for_workers,
)

pytestmark = needs_redis


# --------------------------------------------------------------------------- worker death


async def kill_while_holding(client, stream: str, worker: WorkerProcess, within: float = 20.0) -> None:
    """SIGKILL ``worker`` at a moment it holds entries (read from XPENDING): the front batches
    requests into few entries, so at a random moment the other worker may hold them all."""
    consumer = next(
        name for name in (c["name"].decode() for c in client.xinfo_consumers(stream, "workers"))
        if f"-{worker.process.pid}-" in name
    )
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        if client.xpending_range(stream, "workers", "-", "+", 1, consumername=consumer):
            worker.kill()
            return
        await asyncio.sleep(0.002)


def test_sigkill_one_of_two_workers_under_load_answers_every_request_once(
    redis_server, start_worker, start_server
):
    url = redis_server.url()
    worker_args = ("--redis-url", url, "--model", "tests.redis_models:slow_double", "--visibility-timeout", "2")
    victim = start_worker(*worker_args)
    survivor = start_worker(*worker_args)
    wait_for_workers(redis_server.client(), "slow_double", 2, timeout=60)
    front = start_server(*front_args(url, "tests.redis_models:slow_double"))

    stream = "batchserve::slow_double:requests"
    watching: list[asyncio.Task] = []

    def kill() -> None:  # called from the load's loop after 60 answers
        watching.append(asyncio.get_running_loop().create_task(kill_while_holding(redis_server.client(), stream, victim)))

    started = time.monotonic()
    results = asyncio.run(load(f"{front.url}/models/slow_double/predict", 300, concurrency=30, when_answered={60: kill}))
    elapsed = time.monotonic() - started

    assert victim.process.returncode is not None, "the victim was killed during the load"
    assert sorted(index for index, _, _ in results) == list(range(300)), "each request answered once"
    failures = [(index, status, body) for index, status, body in results if status != 200]
    assert not failures, failures[:5]
    assert all(body == {"outputs": [index * 2]} for index, _, body in results)
    assert elapsed < 60
    client = redis_server.client()
    assert client.xpending(stream, "workers")["pending"] == 0, "every entry acked"
    assert client.xlen(stream) == 0, "answered entries are deleted"
    assert "reclaimed" in survivor.stop(), "the survivor took over the victim's entries"


# --------------------------------------------------------------------------- outage


def test_redis_outage_gives_quick_503s_then_service_resumes(redis_server, start_worker, start_server):
    url = redis_server.url()
    start_worker("--redis-url", url, "--model", "tests.fakes:double", "--visibility-timeout", "2")
    wait_for_workers(redis_server.client(), "double", 1, timeout=60)
    front = start_server(*front_args(url, "tests.fakes:double", "--timeout", "10"))
    log: list[tuple[float, float, int]] = []  # (sent, answered, status)
    stopping = threading.Event()

    def client_loop() -> None:
        with httpx.Client(timeout=30) as client:
            while not stopping.is_set():
                sent = time.monotonic()
                try:
                    status = client.post(f"{front.url}/models/double/predict", json={"inputs": [1]}).status_code
                except httpx.HTTPError:
                    status = 0
                log.append((sent, time.monotonic(), status))
                time.sleep(0.02)

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        warm_until = time.monotonic() + 30
        while sum(status == 200 for _, _, status in log) < 10 and time.monotonic() < warm_until:
            time.sleep(0.1)
        down = time.monotonic()
        redis_server.stop()
        time.sleep(3.0)
        redis_server.start()
        up = time.monotonic()  # Redis answers again
        time.sleep(7.0)
    finally:
        stopping.set()
        for thread in threads:
            thread.join()

    before = [status for _, answered, status in log if answered < down]
    assert len(before) >= 10 and set(before) == {200}, before
    while_down = [(answered - sent, status) for sent, answered, status in log if down + 0.1 < sent and answered < up]
    assert len(while_down) > 10, "the front kept answering while Redis was down"
    assert {status for _, status in while_down} == {503}, while_down
    assert max(seconds for seconds, _ in while_down) < 2.0, f"503s come quickly, not after a timeout: {while_down}"
    assert all(answered - sent < 5.0 for sent, answered, _ in log), "nothing hangs"
    back = [answered for sent, answered, status in log if sent > up and status == 200]
    after = [(round(sent - up, 2), status) for sent, _, status in log if sent > up]
    assert back and back[0] - up < 5.0, f"requests succeed again within 5 s after Redis is back: {after}"
    late = [status for sent, _, status in log if sent > up + 5.0]
    assert late and set(late) == {200}, after


# --------------------------------------------------------------------------- password, hostile entries


class Exploit:
    """Unpickling this would create a file: proof that something ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def read_replies(client, key: str, count: int, timeout: float = 15.0) -> dict[str, dict]:
    replies: dict[str, dict] = {}
    last = "0"
    deadline = time.monotonic() + timeout
    while len(replies) < count and time.monotonic() < deadline:
        for _, entries in client.xread({key: last}, block=500) or []:
            for entry_id, fields in entries:
                last = entry_id
                replies[fields[b"id"].decode()] = fields
    return replies


def test_password_url_no_worker_and_hostile_entries(password_redis, start_worker, start_server, tmp_path):
    url = password_redis.url(db=3)
    front = start_server(*front_args(url, "tests.fakes:double", "--prefix", "secure"))
    started = time.monotonic()
    alone = httpx.post(f"{front.url}/models/double/predict", json={"inputs": [1]}, timeout=30)
    assert alone.status_code == 503 and time.monotonic() - started < 2.0
    assert "no worker" in alone.json()["error"]["message"]
    worker = start_worker("--redis-url", url, "--model", "tests.fakes:double", "--prefix", "secure")
    client = password_redis.client(db=3)
    wait_for_workers(client, "double", 1, prefix="secure", timeout=60)
    answer = httpx.post(f"{front.url}/models/double/predict", json={"inputs": [1, 2]}, timeout=30)
    assert answer.json() == {"outputs": [2, 4]}

    stream = "batchserve:secure:double:requests"
    reply_key = "batchserve:secure:double:replies:intruder"
    marker = tmp_path / "unpickled"
    deadline = repr(time.time() + 30)
    client.xadd(stream, {"id": "pickle", "reply": reply_key, "deadline": deadline,
                         "data": pickle.dumps(Exploit(str(marker)))})
    client.xadd(stream, {"id": "no-data", "reply": reply_key, "deadline": deadline})
    client.xadd(stream, {"id": "not-a-list", "reply": reply_key, "deadline": deadline, "data": wire.dumps(5)})
    client.xadd(stream, {"id": "elsewhere", "reply": "victim:key", "deadline": deadline, "data": wire.dumps([1])})
    client.xadd(stream, {"id": "late", "reply": reply_key, "deadline": repr(time.time() - 1), "data": wire.dumps([1])})
    client.xadd(stream, {"id": "fine", "reply": reply_key, "deadline": deadline, "data": wire.dumps([21])})

    replies = read_replies(client, reply_key, 5)
    assert set(replies) == {"pickle", "no-data", "not-a-list", "late", "fine"}
    errors = {name: wire.loads(fields[b"error"]) for name, fields in replies.items() if b"error" in fields}
    assert {name: error["kind"] for name, error in errors.items()} == {
        "pickle": "invalid_request", "no-data": "invalid_request", "not-a-list": "invalid_request", "late": "deadline",
    }
    assert "malformed" in errors["pickle"]["message"]
    assert wire.loads(replies["fine"][b"data"]) == [42]
    assert not marker.exists(), "the pickle payload was never unpickled"
    assert not client.exists("victim:key"), "replies go only to this model's reply streams"
    for _ in range(50):
        if client.xpending(stream, "workers")["pending"] == 0:
            break
        time.sleep(0.1)
    assert client.xpending(stream, "workers")["pending"] == 0, "bad entries are acked too"
    again = httpx.post(f"{front.url}/models/double/predict", json={"inputs": [5]}, timeout=30)
    assert again.json() == {"outputs": [10]}, "the worker keeps going"
    assert worker.process.poll() is None


async def test_a_front_closed_right_after_its_start_closes_at_once(redis_server):
    """redis-py (8.2) swallows the cancellation of the reader's first blocking XREAD and
    reads on with no deadline: close() hung for ever (a server stopped as soon as it started)."""
    from batchserve.backends.redis.front import RedisBackend

    for _ in range(3):
        front = RedisBackend(redis_server.url(), "double")
        await front.start()
        await asyncio.sleep(0)  # the reader is in its XREAD
        started = time.monotonic()
        await asyncio.wait_for(front.close(), 10)
        assert time.monotonic() - started < 2.0
