"""The HTTP contracts of the server's app, in process: errors, limits, health, metrics, docs.

Each test builds the app with ``create_app`` (the factory `batchserve serve` runs) and
drives it through an ASGI transport (``serve_app`` in conftest.py), so the same routes,
error handlers and middleware (body limit, request metrics) answer as on a socket.
"""

from __future__ import annotations

import asyncio
import time

import httpx

JSON = {"content-type": "application/json"}
MODELS = {
    "models": ["tests.fakes:double", "greeter=tests.fakes:Greeter", "tests.fakes:fragile", "tests.fakes:batch_sizes"],
    "max_batch_size": 8,
    "max_body_bytes": 2000,
}


async def test_validation_errors_are_422_json(serve_app):
    client = await serve_app(**MODELS)
    for body in ({"inputs": []}, {"wrong": [1]}, [1, 2]):
        reply = await client.post("/models/double/predict", json=body)
        assert reply.status_code == 422, body
        assert reply.json()["error"]["type"] == "invalid_request"
    broken = await client.post("/models/double/predict", content=b"{not json", headers=JSON)
    assert broken.status_code == 422
    bad_deadline = await client.post("/models/double/predict", json={"inputs": [1]}, headers={"X-Request-Timeout": "soon"})
    assert bad_deadline.status_code == 422 and "X-Request-Timeout" in bad_deadline.json()["error"]["message"]


async def test_oversize_body_is_413(serve_app):
    client = await serve_app(**MODELS)
    big = {"inputs": ["x" * 100] * 40}
    reply = await client.post("/models/double/predict", json=big)
    assert reply.status_code == 413 and reply.json()["error"]["type"] == "too_large"

    async def chunks():  # no Content-Length: the limit is enforced while streaming
        yield b'{"inputs": ["'
        for _ in range(30):
            yield b"y" * 100
        yield b'"]}'

    streamed = await client.post("/models/double/predict", content=chunks(), headers=JSON)
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413


async def test_health_ready_metrics_docs(serve_app):
    client = await serve_app(**MODELS)
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = (await client.get("/readyz")).json()
    assert ready["ready"] and ready["services"]["models"]["models"]["double"]["workers"] == 1
    await client.post("/models/double/predict", json={"inputs": [1]})
    metrics = (await client.get("/metrics")).text
    for name in ("batchserve_queue_depth", "batchserve_batch_size_bucket", "batchserve_request_duration_seconds",
                 "batchserve_errors_total"):
        assert name in metrics
    assert 'batchserve_batch_size_count{model="double"}' in metrics
    # the request-metrics middleware timed the call, by route template and status
    assert 'batchserve_request_duration_seconds_count{route="/models/{name}/predict",status="200"} 1.0' in metrics
    assert (await client.get("/docs")).status_code == 200
    assert "/models/{name}/predict" in (await client.get("/openapi.json")).json()["paths"]


async def test_overload_is_503_fast_and_deadline_is_504(serve_app):
    client = await serve_app(models=["tests.fakes:sluggish"], max_batch_size=1, max_queue_size=2)
    path = "/models/sluggish/predict"
    # one at a time, so none of them is refused: requests arriving in one tick all count as queued
    running = asyncio.ensure_future(client.post(path, json={"inputs": [0]}))
    await _until_gauge(client, "batchserve_inflight_batches", "sluggish", 1)
    queued = [asyncio.ensure_future(client.post(path, json={"inputs": [i]})) for i in (1, 2)]
    await _until_gauge(client, "batchserve_queue_depth", "sluggish", 2)
    timings = []  # the queue stays full for 2 s (one sluggish batch)
    for _ in range(5):
        started = time.perf_counter()
        probe = await client.post(path, json={"inputs": [9]})
        timings.append(time.perf_counter() - started)
        assert probe.status_code == 503, probe.text
        assert int(probe.headers["Retry-After"]) >= 1
        assert probe.json()["error"]["type"] == "overloaded"
    assert sorted(timings)[2] < 0.05  # median well within 50 ms on a shared machine
    filled = await asyncio.gather(running, *queued)
    assert [reply.json() for reply in filled] == [{"outputs": [i]} for i in range(3)]
    started = time.perf_counter()
    late = await client.post(path, json={"inputs": [1]}, headers={"X-Request-Timeout": "0.2"})
    assert late.status_code == 504 and late.json()["error"]["type"] == "deadline"
    assert time.perf_counter() - started < 1.0


async def _until_gauge(client: httpx.AsyncClient, gauge: str, model: str, value: int, within: float = 10.0) -> None:
    line = f'{gauge}{{model="{model}"}} {float(value)}'
    deadline = time.monotonic() + within
    while line not in (await client.get("/metrics")).text:
        assert time.monotonic() < deadline, f"{gauge} never reached {value}"
        await asyncio.sleep(0.02)


async def test_readyz_is_503_until_the_model_is_loaded(serve_app):
    client = await serve_app(models=["tests.fakes:SlowLoader"], ready_timeout=None)  # SlowLoader: 2 s to load
    statuses = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and 200 not in statuses:
        statuses.append((await client.get("/readyz")).status_code)
        await asyncio.sleep(0.1)
    assert statuses[0] == 503 and statuses[-1] == 200
    early = [s for s in statuses if s == 503]
    assert early, "the app answered while the model loaded"
    assert (await client.post("/models/SlowLoader/predict", json={"inputs": [1]})).json() == {"outputs": [1]}
