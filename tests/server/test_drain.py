"""Graceful drain: SIGTERM/SIGINT turn /readyz 503, finish in-flight requests, exit 0."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_without_cutting_in_flight_requests(start_server, sig):
    server = start_server(
        "--model", "tests.fakes:slow", "--max-batch-size", "2", "--drain-seconds", "1.0", "--grace", "20"
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        in_flight = [asyncio.ensure_future(client.post("/models/slow/predict", json={"inputs": [i]})) for i in range(6)]
        await asyncio.sleep(0.2)  # all six accepted: 3 batches of 2 at 0.5 s each
        server.process.send_signal(sig)
        await asyncio.sleep(0.3)
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        replies = await asyncio.gather(*in_flight)
    assert [reply.status_code for reply in replies] == [200] * 6
    assert [reply.json()["outputs"] for reply in replies] == [[i] for i in range(6)]
    assert await asyncio.to_thread(server.process.wait, 30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=2)
