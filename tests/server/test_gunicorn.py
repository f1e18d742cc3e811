"""Several HTTP processes under gunicorn: the model is loaded once, in the master, and shared."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from batchserve.procinfo import children, descendants, state


@pytest.mark.parametrize("backend", [[], ["--backend", "process", "--workers", "2"]], ids=["thread", "process"])
def test_http_workers_share_the_model_loaded_by_the_master(start_server, backend):
    server = start_server("--model", "tests.process_fakes:WhoLoaded", "--http-workers", "2", *backend)
    master = server.process.pid  # the CLI execs gunicorn: its master keeps the PID
    deadline = time.monotonic() + 30
    while len(children(master)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = children(master)
    assert len(workers) == 2

    def call(i: int) -> dict:
        response = httpx.post(f"{server.url}/models/WhoLoaded/predict", json={"inputs": [i]}, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["outputs"][0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(call, range(40)))
    assert [out["x"] for out in outputs] == list(range(40))
    assert {out["loaded_in"] for out in outputs} == {master}  # loaded once, before the fork
    servers = set(descendants(master)) if backend else set(workers)  # model workers under each HTTP worker
    assert {out["served_by"] for out in outputs} <= servers - {master}

    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200

    everything = descendants(master)
    assert len(everything) == (2 + 2 * 2 if backend else 2)
    server.stop()
    assert all(state(pid) is None for pid in everything)  # reaped: no orphans, no zombies


def test_http_workers_with_a_bad_model_fail_fast(start_server):
    from tests.conftest import ServerProcess

    server = ServerProcess("--model", "tests.process_fakes:nothing_here", "--http-workers", "2", ready_timeout=None)
    assert server.process.wait(timeout=30) == 2
    assert b"nothing_here" in server.process.stdout.read()
    server.stop()
