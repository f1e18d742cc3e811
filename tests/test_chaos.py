"""Chaos: the process backend under load while workers are SIGKILLed and one input raises.

Every request is answered before its deadline, correctly or with a clear error, and the
pool is whole again afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx

DEADLINE = 15.0
CLEAR_ERRORS = {"model", "worker_died", "deadline", "not_ready", "overloaded"}


async def _kill_workers_every(client: httpx.AsyncClient, period: float, stop: asyncio.Event) -> int:
    kills = 0
    while not stop.is_set():
        await asyncio.sleep(period)
        pids = (await client.get("/readyz")).json()["services"]["models"]["models"]["fragile"].get("pids", [])
        if pids:
            try:
                os.kill(pids[kills % len(pids)], signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
    return kills


async def test_workers_killed_and_poison_inputs_under_load(start_server):
    server = start_server("--model", "tests.fakes:fragile", "--backend", "process", "--workers", "2",
                          "--max-batch-size", "8")
    inputs = ["boom" if i % 25 == 0 else f"item{i}" for i in range(200)]
    headers = {"X-Request-Timeout": str(DEADLINE)}
    async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE + 10) as client:
        stop = asyncio.Event()
        killer = asyncio.create_task(_kill_workers_every(client, 0.5, stop))
        pending = iter(enumerate(inputs))
        answers: dict[int, tuple[httpx.Response, float]] = {}

        async def caller() -> None:
            for index, text in pending:
                started = time.monotonic()
                reply = await client.post("/models/fragile/predict", json={"inputs": [text]}, headers=headers)
                answers[index] = (reply, time.monotonic() - started)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(caller() for _ in range(16)))
        stop.set()
        kills = await killer
        assert kills >= 2
        assert sorted(answers) == list(range(200))  # nobody left hanging
        ok = 0
        for index, (reply, seconds) in answers.items():
            assert seconds < DEADLINE + 1.0
            if reply.status_code == 200:
                assert inputs[index] != "boom" and reply.json() == {"outputs": [inputs[index].upper()]}
                ok += 1
            else:
                error = reply.json()["error"]
                assert error["type"] in CLEAR_ERRORS and error["message"], error
                if error["type"] == "model":
                    assert inputs[index] == "boom" and "cannot handle boom" in error["message"]
        assert ok >= 100
        for _ in range(100):  # the pool comes back to two workers
            described = (await client.get("/readyz")).json()["services"]["models"]["models"]["fragile"]
            if described["workers_up"] == 2:
                break
            await asyncio.sleep(0.2)
        assert described["workers_up"] == 2
        assert (await client.post("/models/fragile/predict", json={"inputs": ["again"]})).json() == {"outputs": ["AGAIN"]}
