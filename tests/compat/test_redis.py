"""service-streamer's Redis names, and prefixes keeping models apart on one Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from batchserve.backends.redis.front import RedisBackend
from batchserve.batching import Batcher
from batchserve.compat import RedisStreamer
from batchserve.errors import NotReadyError
from tests import quiet_exit
from tests.conftest import PYTHONPATH, ROOT
from tests.redis_fixtures import needs_redis, redis_server, start_worker, wait_for_workers  # noqa: F401

pytestmark = needs_redis


@pytest.fixture
def run_script():
    """Run Python code in a child process (stopped after the test)."""
    processes: list[subprocess.Popen] = []

    def run(code: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": PYTHONPATH}
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


SERVICE_STREAMER_SHAPE = """
    import json, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    import redis
    from batchserve.compat import RedisStreamer, run_redis_workers_forever
    from tests.redis_models import Scaler, negate

    broker = sys.argv[1]
    for model, options in ((Scaler, {"worker_num": 2, "prefix": "scaled", "model_init_kwargs": {"factor": 3}}),
                           (negate, {"worker_num": 1, "prefix": "negated"})):
        threading.Thread(target=run_redis_workers_forever, args=(model, 8, 0.05),
                         kwargs={"redis_broker": broker, **options}, daemon=True).start()
    leases = redis.Redis.from_url(f"redis://{broker}")
    before = [leases.zcard(f"batchserve:{prefix}:model:workers") for prefix in ("scaled", "negated")]
    scaled = RedisStreamer(broker, prefix="scaled", worker_timeout=90)
    negated = RedisStreamer(broker, prefix="negated", worker_timeout=90)
    with ThreadPoolExecutor(8) as pool:  # at once, while the workers still load
        scaled_calls = [pool.submit(scaled.predict, [n, n + 1]) for n in range(20)]
        negated_calls = [pool.submit(negated.predict, [n]) for n in range(20)]
        print(json.dumps({
            "leases_before": before,
            "scaled": [call.result() for call in scaled_calls],
            "negated": [call.result() for call in negated_calls],
        }))
"""


def test_service_streamer_shape_workers_in_threads_then_predict_at_once(redis_server):
    """service-streamer's own test: workers started in threads, calls made before they are up."""
    done = quiet_exit.run_script(SERVICE_STREAMER_SHAPE, f"127.0.0.1:{redis_server.port}", timeout=180)
    quiet_exit.assert_quiet(done)
    answers = json.loads(done.stdout)
    assert answers["leases_before"] == [0, 0], "the calls were made before any worker was up"
    assert answers["scaled"] == [[3 * n, 3 * n + 3] for n in range(20)]
    assert answers["negated"] == [[-n] for n in range(20)]


def test_redis_streamer_waits_for_a_late_worker_and_times_out_without_one(redis_server, start_worker):
    url = redis_server.url()
    client = redis_server.client()
    lonely = RedisStreamer(url, prefix="nobody", worker_timeout=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            lonely.predict([1])
        with pytest.raises(TimeoutError):
            lonely.submit([2]).result(timeout=None)
        elapsed = time.monotonic() - started
    finally:
        lonely.destroy_workers()
    assert 1.8 <= elapsed < 6.0, elapsed  # each call waited its worker_timeout, then gave up
    assert client.xlen("batchserve:nobody:model:requests") == 0, "nothing was left for a future worker"

    patient = RedisStreamer(url, prefix="late", worker_timeout=90)
    try:
        with ThreadPoolExecutor(4) as pool:
            calls = pool.map(patient.predict, [[n, n + 1] for n in range(8)])
            waiting = time.monotonic() + 10
            while client.xlen("batchserve:late:model:requests") == 0 and time.monotonic() < waiting:
                time.sleep(0.05)
            assert client.xlen("batchserve:late:model:requests") > 0, "the calls wait in the stream, for a worker to come"
            start_worker("--redis-url", url, "--model", "model=tests.redis_models:negate", "--prefix", "late")
            answers = list(calls)
    finally:
        patient.destroy_workers()
    assert answers == [[-n, -n - 1] for n in range(8)]


def test_the_redis_backend_still_refuses_at_once_without_workers_by_default(redis_server):
    """What the HTTP front (``serve --backend redis``) uses: a fast 503, no waiting."""
    batcher = Batcher(RedisBackend(redis_server.url(), "model", prefix="nobody"), timeout=30)
    try:
        started = time.monotonic()
        with pytest.raises(NotReadyError, match="no worker serves 'model'"):
            batcher.predict([1])
        assert time.monotonic() - started < 2.0
    finally:
        batcher.stop()
