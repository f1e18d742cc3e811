"""service-streamer's Redis names, and prefixes keeping models apart on one Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from batchserve.compat import RedisStreamer
from tests.conftest import ROOT
from tests.redis_fixtures import needs_redis, redis_server, start_worker, wait_for_workers  # noqa: F401

pytestmark = needs_redis


@pytest.fixture
def run_script():
    """Run Python code in a child process (stopped after the test)."""
    processes: list[subprocess.Popen] = []

    def run(code: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env)
        processes.append(process)
        return process

    yield run
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_two_prefixes_with_different_models_never_mix_answers(redis_server, start_worker):
    url = redis_server.url()
    start_worker("--redis-url", url, "--model", "model=tests.fakes:double", "--prefix", "a")
    start_worker("--redis-url", url, "--model", "model=tests.redis_models:negate", "--prefix", "b")
    client = redis_server.client()
    wait_for_workers(client, "model", 1, prefix="a", timeout=60)
    wait_for_workers(client, "model", 1, prefix="b", timeout=60)
    doubler = RedisStreamer(url, prefix="a")
    negator = RedisStreamer(url, prefix="b")
    try:
        def ask(number: int) -> tuple:
            return doubler.predict([number, number + 1]), negator.predict([number])

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(200)))
    finally:
        doubler.destroy_workers()
        negator.destroy_workers()
    assert answers == [([2 * n, 2 * n + 2], [-n]) for n in range(200)]


def test_service_streamer_redis_names(redis_server, run_script):
    broker = f"127.0.0.1:{redis_server.port}"  # service-streamer's host:port form
    run_script(f"""
        from batchserve.compat import run_redis_workers_forever
        from tests.redis_models import Scaler
        run_redis_workers_forever(Scaler, 8, 0.05, worker_num=2, redis_broker={broker!r}, prefix="pool",
                                  model_init_kwargs={{"factor": 3}})
    """)
    run_script(f"""
        from batchserve.compat import RedisWorker
        from tests.redis_models import Scaler
        RedisWorker(Scaler, 4, redis_broker={broker!r}, prefix="single", model_init_args=(5,)).run_forever()
    """)
    client = redis_server.client()
    wait_for_workers(client, "model", 1, prefix="pool", timeout=90)
    wait_for_workers(client, "model", 1, prefix="single", timeout=90)
    pool = RedisStreamer(redis_broker=broker, prefix="pool")
    single = RedisStreamer(redis_server.url(), prefix="single")
    try:
        assert pool.predict([1, 2, 3]) == [3, 6, 9]
        assert single.submit([1, 2]).result(timeout=20) == [5, 10]
        with ThreadPoolExecutor(8) as threads:
            futures = [pool.submit([n]) for n in range(50)]
            outputs = list(threads.map(lambda n: single.predict([n]), range(50)))
        assert [future.result() for future in futures] == [[3 * n] for n in range(50)]
        assert outputs == [[5 * n] for n in range(50)]
    finally:
        pool.destroy_workers()
        single.destroy_workers()
