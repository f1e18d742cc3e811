"""A real server started from one config file: each model keeps its own batching under
concurrent load, ``/readyz`` shows what each runs with, and thread counts follow the layout."""

from __future__ import annotations

import asyncio
import time

import httpx

TWO_MODELS = """\
models:
  small: {model: tests.config_models:predict, max_batch_size: 2, timeout: 0.5}
  big:   {model: tests.config_models:Big, max_batch_size: 32, max_latency: 0.05, timeout: 30}
"""


async def batch_sizes(url: str, model: str, requests: int) -> list[int]:
    """Send ``requests`` one-input requests to ``model`` at once; the batch size each ran in."""
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=requests)) as client:

        async def one(index: int) -> int:
            response = await client.post(f"/models/{model}/predict", json={"inputs": [index]})
            assert response.status_code == 200, response.text
            return response.json()["outputs"][0]["batch"]

        return list(await asyncio.gather(*(one(index) for index in range(requests))))


def test_two_models_from_one_file_keep_their_own_batch_sizes(start_server, tmp_path):
    config = tmp_path / "batchserve.yaml"
    config.write_text(TWO_MODELS)
    server = start_server("--config", str(config), "--max-batch-size", "8")  # a flag: the server-wide size

    async def both() -> tuple[list[int], list[int]]:
        return await asyncio.gather(batch_sizes(server.url, "small", 40), batch_sizes(server.url, "big", 40))

    small, big = asyncio.run(both())
    assert max(small) <= 2 and max(small) == 2, small  # batched, never past its own bound
    assert max(big) > 8, big  # its own bound, not the server-wide 8

    ready = httpx.get(f"{server.url}/readyz").json()["services"]["models"]["models"]
    assert ready["small"]["batching"] == {
        "max_batch_size": 2, "max_latency": 0.01, "max_batch_tokens": None, "max_queue_size": 1024, "timeout": 0.5,
    }
    assert ready["big"]["batching"] == {
        "max_batch_size": 32, "max_latency": 0.05, "max_batch_tokens": None, "max_queue_size": 1024, "timeout": 30,
    }

    # each model's own timeout is its requests' default deadline
    started = time.monotonic()
    late = httpx.post(f"{server.url}/models/small/predict", json={"inputs": [{"sleep": 3}]}, timeout=30)
    assert late.status_code == 504 and time.monotonic() - started < 2.5, late.text
    slow = httpx.post(f"{server.url}/models/big/predict", json={"inputs": [{"sleep": 1}]}, timeout=30)
    assert slow.status_code == 200, slow.text


def test_threads_are_the_cores_shared_by_every_computing_process(start_server):
    """Issue 18: with --http-workers 2 on 2 cores, /readyz showed the ONNX encoder with 2
    threads in each HTTP process (4 threads on 2 cores).  Each HTTP process runs its model
    itself, so each gets cores // 2."""
    from batchserve.devices import cpu_count

    server = start_server("--http-workers", "2", "--runtime", "onnx", ready_timeout=300)
    seen = set()
    for _ in range(12):  # answered by either HTTP process
        ready = httpx.get(f"{server.url}/readyz", timeout=10).json()
        model = ready["services"]["embeddings"]["models"]["all-MiniLM-L6-v2"]
        assert model["backend"] == "thread"
        seen.add(model["model"]["threads"])
        # the model's first batch in this process keeps that count (its session opened with it)
        httpx.post(f"{server.url}/v1/embeddings", json={"input": "threads"}, timeout=60).raise_for_status()
    assert seen == {max(1, cpu_count() // 2)}
