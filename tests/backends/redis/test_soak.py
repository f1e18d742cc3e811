"""Soak (`make soak`): a minute of load on two workers while workers are killed and
restarted and Redis restarts; every request is answered once, and only with a result or a
clear 503 (during the Redis outage) / 504."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.redis_fixtures import needs_redis, redis_server, start_worker, wait_for_workers  # noqa: F401

pytestmark = [needs_redis, pytest.mark.slow]

DURATION = 60.0


async def steady_load(url: str, seconds: float, concurrency: int) -> list[tuple[int, float, float, int, object]]:
    """(index, sent, answered, status, body) of every request sent by `concurrency` clients in a loop."""
    results: list[tuple[int, float, float, int, object]] = []
    counter = iter(range(10**9))
    stop_at = time.monotonic() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            index, sent = next(counter), time.monotonic()
            response = await client.post(url, json={"inputs": [index]})
            results.append((index, sent, time.monotonic(), response.status_code, response.json()))
            if response.status_code != 200:
                await asyncio.sleep(0.05)  # a client backs off a little on errors

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return results


def test_a_minute_of_worker_kills_and_a_redis_restart(redis_server, start_worker, start_server):
    url = redis_server.url()
    worker_args = ("--redis-url", url, "--model", "tests.redis_models:slow_double", "--visibility-timeout", "2")
    workers = [start_worker(*worker_args), start_worker(*worker_args)]
    wait_for_workers(redis_server.client(), "slow_double", 2, timeout=60)
    front = start_server("--backend", "redis", "--redis-url", url, "--model", "tests.redis_models:slow_double",
                         "--timeout", "20", "--drain-seconds", "0")

    outage: list[float] = []

    async def chaos() -> None:
        for step in range(5):
            await asyncio.sleep(DURATION / 6)
            if step == 2:
                outage.append(time.monotonic())
                redis_server.stop()
                await asyncio.sleep(2)
                redis_server.start()
                outage.append(time.monotonic())
            else:
                victim = workers.pop(0)
                victim.kill()
                workers.append(start_worker(*worker_args))

    async def run() -> list:
        results, _ = await asyncio.gather(
            steady_load(f"{front.url}/models/slow_double/predict", DURATION, 16), chaos()
        )
        return results

    results = asyncio.run(run())
    down, up = outage
    indexes = [index for index, *_ in results]
    assert len(indexes) == len(set(indexes)), "no request answered twice"
    assert {status for _, _, _, status, _ in results} <= {200, 503, 504}
    assert all(body == {"outputs": [index * 2]} for index, _, _, status, body in results if status == 200)
    # away from the outage (answered before it, or sent 5 s after Redis was back) all succeed
    outside = [
        (round(sent - up, 1), status) for _, sent, answered, status, _ in results if answered < down or sent > up + 5
    ]
    assert len(outside) > 100
    assert {status for _, status in outside} == {200}, [row for row in outside if row[1] != 200][:20]
