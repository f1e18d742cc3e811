"""The HTTP server end to end: a real `batchserve serve` process on loopback."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def models_server():
    from tests.conftest import ServerProcess

    server = ServerProcess(
        "--model", "tests.fakes:double",
        "--model", "greeter=tests.fakes:Greeter",
        "--model", "tests.fakes:fragile",
        "--model", "tests.fakes:batch_sizes",
        "--max-batch-size", "8",
        "--max-body-bytes", "2000",
    )
    yield server
    server.stop()


def test_user_models_answer_independently(models_server):
    url = models_server.url
    assert httpx.post(f"{url}/models/double/predict", json={"inputs": [1, 2.5]}).json() == {"outputs": [2, 5.0]}
    greeted = httpx.post(f"{url}/models/greeter/predict", json={"inputs": ["ada"]}).json()
    assert greeted["outputs"][0]["text"] == "hello ada"
    assert httpx.get(f"{url}/models").json() == {"models": ["batch_sizes", "double", "fragile", "greeter"]}
    missing = httpx.post(f"{url}/models/nope/predict", json={"inputs": [1]})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


async def test_concurrent_http_callers_are_batched(models_server):
    async with httpx.AsyncClient(base_url=models_server.url, timeout=30) as client:
        replies = await asyncio.gather(
            *(client.post("/models/batch_sizes/predict", json={"inputs": [i]}) for i in range(48))
        )
    sizes = [reply.json()["outputs"][0] for reply in replies]
    assert all(reply.status_code == 200 for reply in replies)
    assert max(sizes) > 1 and max(sizes) <= 8


def test_model_error_is_500_with_message_and_no_traceback(models_server):
    reply = httpx.post(f"{models_server.url}/models/fragile/predict", json={"inputs": ["boom"]})
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["type"] == "model" and "cannot handle boom" in error["message"]
    assert "Traceback" not in reply.text and "File " not in reply.text
    ok = httpx.post(f"{models_server.url}/models/fragile/predict", json={"inputs": ["fine"]})
    assert ok.json() == {"outputs": ["FINE"]}


def test_validation_errors_are_422_json(models_server):
    url = models_server.url
    for body in ({"inputs": []}, {"wrong": [1]}, [1, 2]):
        reply = httpx.post(f"{url}/models/double/predict", json=body)
        assert reply.status_code == 422, body
        assert reply.json()["error"]["type"] == "invalid_request"
    broken = httpx.post(f"{url}/models/double/predict", content=b"{not json", headers=JSON)
    assert broken.status_code == 422
    bad_deadline = httpx.post(
        f"{url}/models/double/predict", json={"inputs": [1]}, headers={"X-Request-Timeout": "soon"}
    )
    assert bad_deadline.status_code == 422 and "X-Request-Timeout" in bad_deadline.json()["error"]["message"]


def test_oversize_body_is_413(models_server):
    big = {"inputs": ["x" * 100] * 40}
    reply = httpx.post(f"{models_server.url}/models/double/predict", json=big)
    assert reply.status_code == 413 and reply.json()["error"]["type"] == "too_large"

    def chunks():  # no Content-Length: the limit is enforced while streaming
        yield b'{"inputs": ["'
        for _ in range(30):
            yield b"y" * 100
        yield b'"]}'

    streamed = httpx.post(f"{models_server.url}/models/double/predict", content=chunks(), headers=JSON)
    assert streamed.status_code == 413


def test_health_ready_metrics_docs(models_server):
    url = models_server.url
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["ready"] and ready["services"]["models"]["models"]["double"]["workers"] == 1
    httpx.post(f"{url}/models/double/predict", json={"inputs": [1]})
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("batchserve_queue_depth", "batchserve_batch_size_bucket", "batchserve_request_duration_seconds",
                 "batchserve_errors_total"):
        assert name in metrics
    assert 'batchserve_batch_size_count{model="double"}' in metrics
    assert httpx.get(f"{url}/docs").status_code == 200
    assert "/models/{name}/predict" in httpx.get(f"{url}/openapi.json").json()["paths"]


async def test_overload_is_503_fast_and_deadline_is_504(start_server):
    server = start_server("--model", "tests.fakes:sluggish", "--max-batch-size", "1", "--max-queue-size", "2")
    path = "/models/sluggish/predict"
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
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


def test_readyz_is_503_until_the_model_is_loaded(start_server):
    server = start_server("--model", "tests.fakes:SlowLoader", ready_timeout=None)
    statuses = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and 200 not in statuses:
        try:
            statuses.append(httpx.get(f"{server.url}/readyz", timeout=1).status_code)
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.1)
    assert statuses[0] == 503 and statuses[-1] == 200
    early = [s for s in statuses if s == 503]
    assert early, "the server was listening while the model loaded"
    assert httpx.post(f"{server.url}/models/SlowLoader/predict", json={"inputs": [1]}).json() == {"outputs": [1]}


def test_bad_model_reference_fails_fast(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "batchserve.cli", "serve", "--model", "tests.fakes:missing"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "missing" in result.stderr
