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


async def steady_load(url: str, seconds: float, concurrency: int) -> list[tuple[int, int, object]]:
    results: list[tuple[int, int, object]] = []
    counter = iter(range(10**9))
    stop_at = time.monotonic() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            index = next(counter)
            response = await client.post(url, json={"inputs": [index]})
            results.append((index, response.status_code, response.json()))

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

    async def chaos() -> None:
        for step in range(5):
            await asyncio.sleep(DURATION / 6)
            if step == 2:
                redis_server.stop()
                await asyncio.sleep(2)
                redis_server.start()
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
    indexes = [index for index, _, _ in results]
    assert len(indexes) == len(set(indexes)), "no request answered twice"
    statuses = {status for _, status, _ in results}
    assert statuses <= {200, 503, 504}, statuses
    ok = [(index, body) for index, status, body in results if status == 200]
    assert all(body == {"outputs": [index * 2]} for index, body in ok)
    assert len(ok) > 0.8 * len(results), f"{len(ok)} of {len(results)} succeeded"
