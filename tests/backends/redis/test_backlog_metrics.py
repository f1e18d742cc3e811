"""/metrics of a redis front: each model's request stream (entries, pending) and live workers.

A real redis-server, a real `batchserve worker` held busy by a gated model: the stream's length
counts the batches waiting for a free slot, which a worker has not read (not pending).
"""

from __future__ import annotations

import re
import threading
import time

import httpx

from tests.redis_fixtures import (  # noqa: F401 - fixtures
    front_args,
    needs_redis,
    redis_server,
    start_worker,
    wait_for_workers,
)
from tests.redis_models import GATE_ENV

pytestmark = needs_redis


def backlog(front_url: str, model: str = "gated") -> dict[str, float]:
    text = httpx.get(f"{front_url}/metrics", timeout=10).text
    found = {}
    for name in ("entries", "pending", "workers"):
        match = re.search(rf'^batchserve_stream_{name}{{model="{model}"}} (\S+)$', text, re.M)
        if match:
            found[name] = float(match.group(1))
    return found


def wait_for_backlog(front_url: str, expected: dict[str, float], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = backlog(front_url)
        if seen == expected:
            return
        time.sleep(0.2)
    raise AssertionError(f"/metrics showed {seen}, not {expected}")


def test_the_backlog_gauges_follow_the_stream(redis_server, start_worker, start_server, tmp_path, monkeypatch):
    gate = tmp_path / "open"
    monkeypatch.setenv(GATE_ENV, str(gate))
    url = redis_server.url()
    # one request, one entry (--max-batch-size 1), so the gauges count requests
    front = start_server(*front_args(url, "tests.redis_models:gated", "--wait-for-workers", "--timeout", "120",
                                     "--max-batch-size", "1"))
    wait_for_backlog(front.url, {"entries": 0, "pending": 0, "workers": 0})

    answers: list[int] = []

    def send(n: int) -> None:
        answers.append(httpx.post(f"{front.url}/models/gated/predict", json={"inputs": [n]}, timeout=120).status_code)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    wait_for_backlog(front.url, {"entries": 4, "pending": 0, "workers": 0})

    # a worker with one slot (one batch of one) reads while it has room: the entry it computes,
    # and perhaps one more its batcher queued before the first was dispatched; not the rest
    start_worker("--redis-url", url, "--model", "tests.redis_models:gated", "--max-batch-size", "1")
    wait_for_workers(redis_server.client(), "gated", 1)
    deadline = time.monotonic() + 20
    while backlog(front.url).get("pending", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # the worker would have read everything by now, were it not busy
    seen = backlog(front.url)
    assert seen["entries"] == 4 and seen["workers"] == 1 and 1 <= seen["pending"] <= 2, seen
    assert not answers

    gate.touch()
    for thread in threads:
        thread.join(60)
    assert answers == [200] * 4
    wait_for_backlog(front.url, {"entries": 0, "pending": 0, "workers": 1})


def test_a_front_without_redis_has_no_backlog_gauges(start_server):
    front = start_server("--model", "tests.fakes:double", "--backend", "thread")
    text = httpx.get(f"{front.url}/metrics", timeout=10).text
    assert "# TYPE batchserve_stream_entries gauge" in text
    assert "batchserve_stream_entries{" not in text
