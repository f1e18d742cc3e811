"""A stop is not a crash: SIGTERM sent to the whole process group (systemd's default KillMode,
`timeout`, a container runtime stopping every process) during a normal shutdown.

The model workers ignore it; their front drains, then stops them: none dies of the signal, none
is restarted, nothing is logged as a failure, and batches in flight are answered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import PYTHONPATH, ROOT, free_port
from tests.redis_fixtures import needs_redis, redis_server, wait_for_workers  # noqa: F401 - fixtures

FAILURES = ("killed by", "restarting", "Traceback", "died")


class Group:
    """A `batchserve` command in its own process group (a session), its output in a file."""

    def __init__(self, output: Path, *args: str):
        self.output = output
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": PYTHONPATH}
        with open(output, "wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "batchserve.cli", *args, "--log-level", "info"],
                cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def sigterm_group(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def group_is_gone(self, timeout: float = 10.0) -> bool:
        """No process of the group is left (no orphan of the front's)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_ready(url: str, group: Group, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert group.process.poll() is None, group.text()
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(group.text())


@pytest.mark.parametrize("http_workers", [1, 2])
async def test_a_process_group_sigterm_drains_the_process_backend_without_a_restart(tmp_path, http_workers):
    """Under gunicorn (2 HTTP processes) the group holds the master, its HTTP processes and each one's workers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Group(
        tmp_path / "serve.log", "serve", "--port", str(port), "--model", "tests.fakes:slow", "--backend", "process",
        "--workers", "2", "--max-batch-size", "2", "--drain-seconds", "1", "--grace", "20",
        "--http-workers", str(http_workers),
    )
    try:
        wait_ready(url, server)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            in_flight = [asyncio.ensure_future(client.post("/models/slow/predict", json={"inputs": [i]})) for i in range(6)]
            await asyncio.sleep(0.2)  # the workers compute: 3 batches of 2, half a second each, on 2 workers
            server.sigterm_group()
            await asyncio.sleep(0.3)
            if http_workers == 1:  # uvicorn drains for --drain-seconds (gunicorn's master stops listening at once)
                during = await client.post("/models/slow/predict", json={"inputs": [9]})
                assert during.status_code == 200 and during.json() == {"outputs": [9]}
            replies = await asyncio.gather(*in_flight)
        assert [reply.status_code for reply in replies] == [200] * 6
        assert [reply.json()["outputs"] for reply in replies] == [[i] for i in range(6)]
        assert await asyncio.to_thread(server.wait, 30) == 0
        assert server.group_is_gone(), "every worker stopped with the server"
    finally:
        server.stop()
    output = server.text()
    assert not [line for line in output.splitlines() if any(word in line for word in FAILURES)], output
    assert output.count("starting on cpu") == 2 * http_workers, f"no worker was restarted:\n{output}"


@needs_redis
def test_a_process_group_sigterm_stops_a_redis_worker_cleanly(redis_server, start_server, tmp_path):
    url = redis_server.url()
    worker = Group(tmp_path / "worker.log", "worker", "--redis-url", url, "--model", "tests.fakes:slow", "--workers", "2")
    try:
        wait_for_workers(redis_server.client(), "slow", 1, timeout=60)
        front = start_server("--backend", "redis", "--redis-url", url, "--model", "tests.fakes:slow", "--timeout", "10")
        with httpx.Client(timeout=30) as client:
            client.post(f"{front.url}/models/slow/predict", json={"inputs": [0]})  # warm

            def held() -> int:
                return redis_server.client().xpending("batchserve::slow:requests", "workers")["pending"]

            answers: list = []
            sender = threading.Thread(
                target=lambda: answers.append(client.post(f"{front.url}/models/slow/predict", json={"inputs": [1, 2]}))
            )
            sender.start()
            deadline = time.monotonic() + 10
            while held() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert held() == 1, "the worker holds the batch"
            worker.sigterm_group()  # while its model process computes it
            sender.join(30)
        assert answers[0].status_code == 200 and answers[0].json() == {"outputs": [1, 2]}, "what it held is answered"
        assert worker.wait(30) == 0
        assert worker.group_is_gone()
    finally:
        worker.stop()
    output = worker.text()
    assert not [line for line in output.splitlines() if any(word in line for word in FAILURES)], output
    assert output.count("starting on cpu") == 2, f"no model process was restarted:\n{output}"
