"""Scale from zero: ``serve --backend redis --wait-for-workers`` queues batches while no worker is up.

The front writes each batch into the request stream at once, so the stream's length shows the
work (what an autoscaler such as KEDA's redis-streams scaler watches) and a worker started
later answers it; a batch whose deadline passes first is answered 504 and never computed.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from batchserve import wire
from batchserve.backends.redis.front import RedisBackend
from batchserve.errors import NotReadyError
from tests.redis_fixtures import (  # noqa: F401 - fixtures
    front_args,
    needs_redis,
    redis_server,
    start_worker,
    wait_for_workers,
)
from tests.redis_models import RECORD_ENV

pytestmark = needs_redis

STREAM = "batchserve::record:requests"
MODEL = "tests.redis_models:record"


def computed(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def post_in_thread(url: str, inputs: list, answers: dict, headers: dict | None = None) -> threading.Thread:
    def send() -> None:
        started = time.monotonic()
        response = httpx.post(url, json={"inputs": inputs}, headers=headers or {}, timeout=120)
        answers[inputs[0]] = (response.status_code, response.json(), time.monotonic() - started)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_request_sent_with_no_worker_up_is_answered_by_a_worker_started_later(
    redis_server, start_worker, start_server, tmp_path, monkeypatch
):
    record = tmp_path / "computed"
    monkeypatch.setenv(RECORD_ENV, str(record))
    url = redis_server.url()
    client = redis_server.client()
    front = start_server(*front_args(url, MODEL, "--wait-for-workers", "--timeout", "120"))  # waits for /readyz 200
    ready = httpx.get(f"{front.url}/readyz", timeout=5)
    assert ready.status_code == 200, "a front that queues is ready with no worker"
    facts = ready.json()["services"]["models"]["models"]["record"]
    assert facts["workers"] == 0 and facts["wait_for_workers"] is True, facts

    answers: dict = {}
    threads = [post_in_thread(f"{front.url}/models/record/predict", [n, n + 100], answers) for n in range(3)]
    wait_until(lambda: client.xlen(STREAM) >= 1, 10, "the batches in the request stream")
    time.sleep(1.0)
    assert not answers, "nothing answers the requests while no worker is up"
    assert 1 <= client.xlen(STREAM) <= 3, "the stream's length shows the waiting batches"
    gauge = re.search(r'^batchserve_stream_entries{model="record"} (\S+)$', httpx.get(f"{front.url}/metrics").text, re.M)
    assert gauge and float(gauge.group(1)) == client.xlen(STREAM), "and so does /metrics"
    assert httpx.get(f"{front.url}/readyz", timeout=5).status_code == 200

    worker = start_worker("--redis-url", url, "--model", MODEL)
    for thread in threads:
        thread.join(120)
    assert {n: (status, body) for n, (status, body, _) in answers.items()} == {
        n: (200, {"outputs": [2 * n, 2 * (n + 100)]}) for n in range(3)
    }
    assert sorted(computed(record)) == sorted([*range(3), *range(100, 103)]), "each item computed once"
    wait_until(lambda: client.xlen(STREAM) == 0, 10, "answered entries deleted")
    wait_until(
        lambda: httpx.get(f"{front.url}/readyz", timeout=5).json()["services"]["models"]["models"]["record"]["workers"] == 1,
        10, "/readyz counting the worker",
    )
    assert worker.process.poll() is None


def test_a_batch_whose_deadline_passes_before_a_worker_starts_is_answered_504_and_never_computed(
    redis_server, start_worker, start_server, tmp_path, monkeypatch
):
    record = tmp_path / "computed"
    monkeypatch.setenv(RECORD_ENV, str(record))
    url = redis_server.url()
    client = redis_server.client()
    front = start_server(*front_args(url, MODEL, "--wait-for-workers", "--timeout", "120"))

    answers: dict = {}
    short = post_in_thread(f"{front.url}/models/record/predict", [7], answers, {"X-Request-Timeout": "1.5"})
    wait_until(lambda: client.xlen(STREAM) == 1, 10, "the batch in the request stream")
    short.join(30)
    status, body, seconds = answers[7]
    assert status == 504, body
    assert body["error"]["type"] == "deadline", body
    assert 1.5 <= seconds < 3.0, seconds
    # a second of grace after the deadline (a worker's own answer would be clearer), then deleted
    wait_until(lambda: client.xlen(STREAM) == 0, 3.0, "the front deleting the entry it gave up on")

    # entries a front could not delete (it died): the worker skips the expired one uncomputed
    reply_key = "batchserve::record:replies:gone"
    client.xadd(STREAM, {"id": "late", "reply": reply_key, "deadline": repr(time.time() - 1), "data": wire.dumps([8])})
    client.xadd(STREAM, {"id": "fine", "reply": reply_key, "deadline": repr(time.time() + 60), "data": wire.dumps([9])})
    start_worker("--redis-url", url, "--model", MODEL)
    replies: dict = {}
    deadline = time.monotonic() + 120
    while len(replies) < 2 and time.monotonic() < deadline:
        for _, entries in client.xread({reply_key: "0"}, block=500) or []:
            replies = {fields[b"id"].decode(): fields for _, fields in entries}
    assert wire.loads(replies["late"][b"error"])["kind"] == "deadline"
    assert wire.loads(replies["fine"][b"data"]) == [18]
    wait_for_workers(client, "record", 1)
    answer = httpx.post(f"{front.url}/models/record/predict", json={"inputs": [10]}, timeout=30)
    assert answer.json() == {"outputs": [20]}
    assert computed(record) == [9, 10], "neither the request given up on nor the expired entry was computed"


async def test_a_front_shutting_down_deletes_the_entries_nobody_will_read_the_answers_of(redis_server):
    """A queued batch fails with the front's shutdown (503), and its entry goes too: a worker
    scaled up for it later would compute it for nobody."""
    client = redis_server.client()
    front = RedisBackend(redis_server.url(), "record", wait_for_workers=True, default_timeout=60)
    await front.start()
    try:
        waiting = asyncio.ensure_future(front.run([1, 2]))
        for _ in range(100):
            if client.xlen(STREAM) == 1:
                break
            await asyncio.sleep(0.02)
        assert client.xlen(STREAM) == 1 and not waiting.done()
    finally:
        await front.close()
    with pytest.raises(NotReadyError, match="shutting down"):
        await waiting
    assert client.xlen(STREAM) == 0
