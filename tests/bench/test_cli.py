"""`batchserve bench URL`: the load generator against a real server with a fake model of known cost.

RecordingModel sleeps COST seconds per batch in the one model thread, so batches run one
after the other: a request never answers faster than COST, and the run lasts at least
``batches * COST``.  Those are the bounds the figures must respect, whatever the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from batchserve.bench.bodies import TEMPLATES, request_bodies, sentences
from batchserve.bench.load import LoadPlan, LoadResult, Outcome
from batchserve.bench.report import summarize
from batchserve.bench.run import endpoint
from batchserve.bench.scrape import batch_sizes_during, parse_batch_sizes
from tests.conftest import ROOT, ServerProcess

COST = 0.010  # RecordingModel's fixed cost per batch, seconds
MODEL = "RecordingModel"


def bench(url: str, *args: str) -> dict:
    """Run the real command in its own process and return its --json summary."""
    command = [sys.executable, "-m", "batchserve.cli", "bench", url, "--app", "custom", "--model", MODEL, "--json", *args]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout)


@pytest.fixture(scope="module")
def fake_server():
    server = ServerProcess("--model", f"tests.fakes:{MODEL}", "--max-batch-size", "8", "--max-latency", "0.005")
    yield server
    server.stop()


def test_one_client_is_bounded_by_the_model_cost(fake_server):
    summary = bench(fake_server.url, "--concurrency", "1", "--requests", "40")
    assert summary["mode"] == "closed" and summary["sent"] == 40 and summary["ok"] == 40
    assert summary["errors"] == {}
    latency = summary["latency_ms"]
    assert COST * 1000 <= latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert latency["p50"] < 500  # generous: a 10 ms model on an idle server
    assert 1 <= summary["throughput"] <= 1 / COST  # one request at a time, each at least COST
    sizes = summary["batch_sizes"][MODEL]
    assert sizes["batches"] == 40 and sizes["mean"] == 1.0  # nobody to share a batch with
    assert sizes["distribution"]["1"] == 40


def test_concurrent_clients_share_batches_within_the_cost_bounds(fake_server):
    summary = bench(fake_server.url, "--concurrency", "16", "--requests", "240")
    assert summary["sent"] == 240 and summary["ok"] == 240
    sizes = summary["batch_sizes"][MODEL]
    assert sizes["items"] == 240
    assert sizes["mean"] > 1.0  # the batcher merged concurrent requests
    assert max(int(label.split("-")[-1]) for label, n in sizes["distribution"].items() if n) <= 8
    # Batches run one after another in the model thread, each at least COST.
    assert summary["elapsed_s"] >= sizes["batches"] * COST * 0.95
    assert summary["throughput"] <= 8 / COST  # at most max_batch_size items per COST
    assert summary["latency_ms"]["p50"] >= COST * 1000


def test_open_loop_sends_at_the_offered_rate(fake_server):
    summary = bench(fake_server.url, "--rate", "40", "--duration", "1.5")
    assert summary["mode"] == "open" and summary["rate"] == 40
    assert summary["sent"] == 60  # due at 0, 1/40, ... < 1.5 s, whatever the server does
    assert summary["ok"] == 60
    assert summary["latency_ms"]["p50"] >= COST * 1000


def test_human_summary_shows_throughput_and_batches(fake_server):
    command = [sys.executable, "-m", "batchserve.cli", "bench", fake_server.url, "--app", "custom",
               "--model", MODEL, "-c", "4", "-n", "20"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "req/s" in finished.stdout and "latency p99" in finished.stdout
    assert f"batches of {MODEL}" in finished.stdout


def test_overload_503s_are_counted_as_errors(start_server):
    server = start_server("--model", f"tests.fakes:{MODEL}", "--max-batch-size", "2", "--max-queue-size", "2")
    summary = bench(server.url, "--concurrency", "32", "--requests", "160")
    assert summary["sent"] == 160
    assert summary["errors"].get("503", 0) > 0
    assert summary["ok"] > 0
    assert summary["ok"] + sum(summary["errors"].values()) == 160
    assert set(summary["errors"]) == {"503"}


def test_unreachable_target_fails_with_connection_errors():
    command = [sys.executable, "-m", "batchserve.cli", "bench", "http://127.0.0.1:9", "-n", "3", "--json"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 1
    summary = json.loads(finished.stdout)
    assert summary["ok"] == 0 and summary["errors"] == {"ConnectError": 3}
    assert summary["batch_sizes"] is None


def test_a_path_the_server_does_not_serve_is_named_with_what_it_serves(fake_server):
    # the README's step 6 against a server without the embeddings app: a whole run of 404s before
    command = [sys.executable, "-m", "batchserve.cli", "bench", fake_server.url, "--duration", "30"]
    started = time.monotonic()
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 20  # refused after one request, not after the run
    assert finished.returncode == 2 and finished.stdout == ""
    said = finished.stderr
    assert said.startswith("batchserve bench: POST /v1/embeddings answered 404: "), said
    assert "It serves POST /models/{name}/predict." in said
    assert f"Its models (GET /v1/models): {MODEL}." in said
    assert f"--app custom --model {MODEL}" in said


# --------------------------------------------------------------------------- pieces


def test_bodies_mix_short_and_long_texts_and_fit_every_app():
    texts = sentences(400)
    lengths = np.array([len(text.split()) for text in texts])
    assert (lengths <= 10).sum() > 250 and (lengths >= 40).sum() > 50
    assert sentences(10, seed=3) == sentences(10, seed=3)
    for app in TEMPLATES:
        bodies = request_bodies(app, items=2, pool=8)
        assert len(bodies) == 8 and all(isinstance(json.loads(body), dict) for body in bodies)
    assert json.loads(request_bodies("embeddings", items=3, pool=1)[0])["input"][2]
    assert "[MASK]" in json.loads(request_bodies("infill", pool=1)[0])["text"]


def test_endpoint_adds_the_app_path_to_a_bare_server_url():
    assert endpoint("http://127.0.0.1:8000", "embeddings", None) == (
        "http://127.0.0.1:8000/v1/embeddings", "http://127.0.0.1:8000")
    assert endpoint("127.0.0.1:8000/", "custom", "m")[0] == "http://127.0.0.1:8000/models/m/predict"
    assert endpoint("http://h:1/other", "embeddings", None) == ("http://h:1/other", "http://h:1")
    with pytest.raises(ValueError):
        endpoint("http://h:1", "custom", None)


def test_batch_sizes_are_the_difference_between_two_scrapes():
    def exposition(ones: int, fours: int) -> str:
        total, items = ones + fours, ones + 4 * fours
        return "\n".join([
            "# TYPE batchserve_batch_size histogram",
            f'batchserve_batch_size_bucket{{le="1.0",model="m"}} {ones}',
            f'batchserve_batch_size_bucket{{le="2.0",model="m"}} {ones}',
            f'batchserve_batch_size_bucket{{le="4.0",model="m"}} {total}',
            f'batchserve_batch_size_bucket{{le="+Inf",model="m"}} {total}',
            f'batchserve_batch_size_count{{model="m"}} {total}',
            f'batchserve_batch_size_sum{{model="m"}} {items}',
            "",
        ])

    during = batch_sizes_during(parse_batch_sizes(exposition(2, 1)), parse_batch_sizes(exposition(5, 4)))
    assert during == {"m": {"batches": 6, "items": 15, "mean": 2.5,
                            "distribution": {"1": 3, "2": 0, "3-4": 3, ">4": 0}}}
    assert batch_sizes_during(None, parse_batch_sizes(exposition(1, 1))) is None


def test_summary_percentiles_and_errors():
    plan = LoadPlan(url="http://x/y", bodies=[b"{}"], concurrency=2)
    outcomes = [Outcome(0.0, ms / 1000, "200") for ms in range(1, 101)]
    outcomes += [Outcome(0.0, 0.001, "503"), Outcome(0.0, 0.5, "ReadTimeout")]
    summary = summarize(LoadResult(plan, outcomes, elapsed=2.0))
    assert summary.sent == 102 and summary.ok == 100 and summary.throughput == 50.0
    assert summary.errors == {"503": 1, "ReadTimeout": 1}
    assert summary.latency_ms["p50"] == pytest.approx(50.5)
    assert summary.latency_ms["p99"] == pytest.approx(99.01)
    assert summary.latency_ms["max"] == pytest.approx(100.0)


def test_throughput_leaves_out_answers_after_the_window():
    plan = LoadPlan(url="http://x/y", bodies=[b"{}"], concurrency=2, duration=1.0)
    outcomes = [Outcome(0.1 * i, 0.05, "200") for i in range(10)]  # all answered by 0.95 s
    outcomes += [Outcome(0.9, 0.5, "200"), Outcome(0.95, 1.0, "200")]  # drained after the window
    summary = summarize(LoadResult(plan, outcomes, elapsed=1.95))
    assert summary.ok == 12 and summary.throughput == pytest.approx(10.0)


def test_plan_needs_exactly_one_kind_of_load():
    with pytest.raises(ValueError):
        LoadPlan(url="http://x", bodies=[b"{}"], concurrency=2, rate=5.0)
    with pytest.raises(ValueError):
        LoadPlan(url="http://x", bodies=[b"{}"], concurrency=None, rate=None)
