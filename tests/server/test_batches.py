"""OpenAI's Batch API (/v1/files, /v1/batches) with the official client, against a real
`batchserve serve` on loopback with an API key: upload, create, poll, results; errors and limits;
cancel; a server stopped mid-batch and started again finishes it, every line once."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import ServerProcess

KEY = "sk-batch-test-key"
EMBEDDER = "all-MiniLM-L6-v2"
WORDS = "the cat sat on a mat while rain fell over quiet hills and rivers ran to the sea".split()


def embedding_lines(count: int, start: int = 0) -> list[dict]:
    return [
        {"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"input": " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 9))}}
        for i in range(start, start + count)
    ]


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((json.dumps(line) if not isinstance(line, str) else line) + "\n" for line in lines))
    return path


def wait_for(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.2)
    raise TimeoutError(f"batch {batch_id} still {batch.status}")


def results(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def http_requests(server, route: str) -> float:
    """The HTTP requests /metrics has counted on ``route``, every status."""
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    prefix = f'batchserve_request_duration_seconds_count{{route="{route}",'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("batches")


@pytest.fixture(scope="module")
def server(batch_dir):
    server = ServerProcess("--app", "embeddings", "--api-key", KEY, "--batch-dir", str(batch_dir),
                           "--batch-max-files", "6", "--batch-max-file-bytes", "1000000")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=60, max_retries=0) as client:
        yield client


def test_a_batch_runs_through_the_routes_and_its_results_are_the_routes_answers(server, client, tmp_path):
    counted = http_requests(server, "/v1/embeddings")
    lines = embedding_lines(40)
    bad = ["{not json", {"custom_id": "empty", "method": "POST", "url": "/v1/embeddings", "body": {"input": ""}}]
    uploaded = client.files.create(file=write_lines(tmp_path / "in.jsonl", lines + bad).open("rb"), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == (tmp_path / "in.jsonl").stat().st_size
    assert client.files.retrieve(uploaded.id).filename == "in.jsonl"

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                                  metadata={"job": "test"})
    assert batch.status == "validating" and batch.metadata == {"job": "test"}
    batch = wait_for(client, batch.id, {"completed", "failed"})
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.total == 42
    assert (batch.request_counts.completed, batch.request_counts.failed) == (40, 2)
    assert batch.completed_at >= batch.in_progress_at >= batch.created_at

    answered = results(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in answered) == sorted(line["custom_id"] for line in lines)
    online = client.embeddings.create(model=EMBEDDER, input=lines[5]["body"]["input"]).data[0].embedding
    (fifth,) = [line for line in answered if line["custom_id"] == "doc-5"]
    assert fifth["response"]["status_code"] == 200
    assert np.allclose(fifth["response"]["body"]["data"][0]["embedding"], online, atol=1e-5)
    assert http_requests(server, "/v1/embeddings") == counted + 1  # the batch's lines are not HTTP requests

    errors = {line["custom_id"]: line for line in results(client, batch.error_file_id)}
    assert errors["empty"]["response"]["status_code"] == 422
    assert errors[None]["error"]["code"] == "invalid_json_line" and errors[None]["error"]["line"] == 41
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in client.batches.list()]


def test_a_batch_that_cannot_run_as_a_whole_fails_with_its_errors(client, tmp_path):
    twice = embedding_lines(3) + embedding_lines(1)
    mixed = embedding_lines(2) + [{"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": {}}]
    for lines, code in ((twice, "duplicate_custom_id"), (mixed, "mismatched_endpoint")):
        uploaded = client.files.create(file=write_lines(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        batch = wait_for(client, batch.id, {"completed", "failed"})
        assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
        assert [error.code for error in batch.errors.data] == [code]
        client.files.delete(uploaded.id)


def test_refusals_are_typed_errors(server, client, tmp_path):
    path = write_lines(tmp_path / "in.jsonl", embedding_lines(2))
    with pytest.raises(openai.BadRequestError, match="purpose must be batch"):
        client.files.create(file=path.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-" + "0" * 24, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_../../etc/passwd")
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="does not serve /v1/chat/completions"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.UnprocessableEntityError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="1h")
    with pytest.raises(openai.AuthenticationError):
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0) as stranger:
            stranger.files.list()
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * 1_100_000)
    with pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=big.open("rb"), purpose="batch")
    assert refused.value.status_code == 413
    kept = [f for f in client.files.list() if f.purpose == "batch"]
    with pytest.raises(openai.BadRequestError, match="at most 6 uploaded files"):
        for _ in range(7 - len(kept)):
            client.files.create(file=path.open("rb"), purpose="batch")
    for file in client.files.list():
        if file.purpose == "batch":
            client.files.delete(file.id)
    answer = httpx.post(f"{server.url}/v1/files", headers={"Authorization": f"Bearer {KEY}"}, json={"purpose": "batch"})
    assert answer.status_code == 400 and "multipart" in answer.json()["error"]["message"]


def test_cancel_keeps_what_was_done(client, tmp_path):
    uploaded = client.files.create(file=write_lines(tmp_path / "in.jsonl", embedding_lines(3000)).open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_for(client, batch.id, {"in_progress"})
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_for(client, batch.id, {"cancelled"})
    assert batch.cancelled_at and batch.request_counts.completed < 3000
    assert len(results(client, batch.output_file_id)) == batch.request_counts.completed
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    client.files.delete(uploaded.id)


def test_a_server_stopped_mid_batch_finishes_it_when_started_again(tmp_path):
    args = ("--app", "embeddings", "--batch-dir", str(tmp_path / "batches"), "--grace", "5")
    lines = embedding_lines(4000)
    first = ServerProcess(*args)
    try:
        with openai.OpenAI(base_url=f"{first.url}/v1", api_key="unused", max_retries=0) as client:
            uploaded = client.files.create(file=write_lines(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch")
            batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
            deadline = time.monotonic() + 120
            while client.batches.retrieve(batch.id).request_counts.completed < 200 and time.monotonic() < deadline:
                time.sleep(0.1)
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(60) == 0
    finally:
        first.stop()
    stopped = json.loads((tmp_path / "batches" / "batches" / f"{batch.id}.json").read_text())
    assert stopped["status"] == "in_progress" and 0 < stopped["request_counts"]["completed"] < len(lines)

    second = ServerProcess(*args)
    try:
        with openai.OpenAI(base_url=f"{second.url}/v1", api_key="unused", max_retries=0) as client:
            batch = wait_for(client, batch.id, {"completed", "failed"}, timeout=180)
            assert batch.status == "completed" and batch.request_counts.completed == len(lines)
            answered = [line["custom_id"] for line in results(client, batch.output_file_id)]
    finally:
        second.stop()
    assert len(answered) == len(set(answered)) == len(lines)  # every line once, none twice


def test_a_server_with_no_batch_running_stops_at_once(tmp_path):
    """The grace is for a running batch's requests: an idle Batch API does not wait it out."""
    server = ServerProcess("--model", "tests.fakes:double", "--batch-dir", str(tmp_path), "--grace", "30")
    try:
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        assert time.monotonic() - started < 10
    finally:
        server.stop()
