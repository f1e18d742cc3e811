"""Overload: an open-loop load at 3x the measured capacity must not collapse the server.

Accepted requests finish within their deadline, rejected ones get a fast 503 with
Retry-After, and goodput during overload stays >= 90 % of goodput at capacity.
The short run is part of `make test`; the 60-second run is in `make soak`.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from batchserve.bench import LoadPlan, run_load

DEADLINE = 2.0
BODY = b'{"inputs": [1]}'


async def _goodput(plan: LoadPlan) -> tuple[float, list]:
    result = await run_load(plan)
    accepted = [o for o in result.outcomes if o.status == "200"]
    return len(accepted) / result.elapsed, result.outcomes


async def overload_run(url: str, seconds: float) -> dict:
    endpoint = f"{url}/models/fixed_cost/predict"
    headers = {"X-Request-Timeout": str(DEADLINE)}
    capacity, _ = await _goodput(LoadPlan(endpoint, [BODY], concurrency=8, duration=seconds / 2, headers=headers))
    goodput, outcomes = await _goodput(
        LoadPlan(endpoint, [BODY], concurrency=None, rate=3 * capacity, duration=seconds, headers=headers, timeout=DEADLINE + 5)
    )
    accepted = np.array([o.latency for o in outcomes if o.status == "200"])
    rejected = np.array([o.latency for o in outcomes if o.status == "503"])
    return {
        "capacity": capacity,
        "goodput": goodput,
        "statuses": sorted({o.status for o in outcomes}),
        "accepted_p99": float(np.percentile(accepted, 99)),
        "rejected": len(rejected),
        "rejected_p50": float(np.percentile(rejected, 50)) if len(rejected) else 0.0,
        "rejected_p99": float(np.percentile(rejected, 99)) if len(rejected) else 0.0,
    }


def _start(start_server):
    return start_server(
        "--model", "tests.fakes:fixed_cost", "--max-batch-size", "2", "--max-queue-size", "16", "--max-latency", "0"
    )


def _check(figures: dict) -> None:
    print(figures)
    assert set(figures["statuses"]) <= {"200", "503"}, figures  # no 504, no 500, no dropped connection
    assert figures["rejected"] > 0
    assert figures["accepted_p99"] <= DEADLINE
    assert figures["rejected_p50"] <= 0.05
    assert figures["goodput"] >= 0.9 * figures["capacity"], figures


async def test_overload_short(start_server):
    server = _start(start_server)
    figures = await overload_run(server.url, seconds=6)
    _check(figures)
    refused = None
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        burst = await asyncio.gather(
            *(client.post("/models/fixed_cost/predict", content=BODY, headers={"content-type": "application/json"})
              for _ in range(40))
        )
        refused = next(r for r in burst if r.status_code == 503)
    assert int(refused.headers["Retry-After"]) >= 1


@pytest.mark.slow
async def test_overload_60_seconds(start_server):
    server = _start(start_server)
    _check(await overload_run(server.url, seconds=60))
