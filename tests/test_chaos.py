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
REQUESTS = 200
#: a worker is killed when this many answers have come: the kills fall inside the load
#: however fast the machine answers (a kill every 0.5 s could all come after a fast run)
KILL_AFTER_ANSWERS = (30, 70, 110, 150)
CLEAR_ERRORS = {"model", "worker_died", "deadline", "not_ready", "overloaded"}


async def _kill_a_worker(client: httpx.AsyncClient, killed: list[int], within: float = 10.0) -> None:
    """SIGKILL one of the model's workers, waiting (at most ``within`` s) for one to be up."""
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        pids = (await client.get("/readyz")).json()["services"]["models"]["models"]["fragile"].get("pids", [])
        if pids:
            victim = pids[len(killed) % len(pids)]
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass  # gone between /readyz and now: ask again
            else:
                killed.append(victim)
                return
        await asyncio.sleep(0.05)


async def test_workers_killed_and_poison_inputs_under_load(start_server):
    server = start_server("--model", "tests.fakes:fragile", "--backend", "process", "--workers", "2",
                          "--max-batch-size", "8")
    inputs = ["boom" if i % 25 == 0 else f"item{i}" for i in range(REQUESTS)]
    headers = {"X-Request-Timeout": str(DEADLINE)}
    async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE + 10) as client:
        pending = iter(enumerate(inputs))
        answers: dict[int, tuple[httpx.Response, float]] = {}
        killed: list[int] = []
        killers: list[asyncio.Task] = []

        async def caller() -> None:
            for index, text in pending:
                started = time.monotonic()
                reply = await client.post("/models/fragile/predict", json={"inputs": [text]}, headers=headers)
                answers[index] = (reply, time.monotonic() - started)
                if len(answers) in KILL_AFTER_ANSWERS:
                    killers.append(asyncio.create_task(_kill_a_worker(client, killed)))
                await asyncio.sleep(0.01)

        await asyncio.gather(*(caller() for _ in range(16)))
        await asyncio.gather(*killers)
        kills = len(killed)
        assert kills >= 2
        assert kills == len(KILL_AFTER_ANSWERS), killed  # each scheduled kill found a worker to kill
        assert sorted(answers) == list(range(REQUESTS))  # nobody left hanging
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
        assert described["restarts"] >= kills  # every killed worker was replaced
        assert (await client.post("/models/fragile/predict", json={"inputs": ["again"]})).json() == {"outputs": ["AGAIN"]}
