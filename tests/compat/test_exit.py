"""A script that used a service-streamer class exits quietly, with or without destroy_workers().

Each case runs a small script in a child interpreter (``-W default``) and checks its exit
status and stderr: no "Task was destroyed but it is pending!", "Event loop is closed",
"coroutine ... was never awaited", ResourceWarning or traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import PYTHONPATH, ROOT
from tests.quiet_exit import assert_quiet, noisy, run_script
from tests.redis_fixtures import needs_redis, redis_server, wait_for_workers  # noqa: F401

LOCAL_SCRIPT = """
    import sys
    from batchserve.compat import Streamer, ThreadedStreamer
    from tests.compat_models import square_or_fail

    kind, ending = sys.argv[1:3]
    if kind == "threaded":
        streamer = ThreadedStreamer(square_or_fail, batch_size=8, max_latency=0.01)
    else:
        streamer = Streamer(square_or_fail, batch_size=8, max_latency=0.01, worker_num=2, mp_start_method=kind)
    print(streamer.predict([1, 2, 3]), streamer.submit([4]).result(timeout=60))
    if ending == "destroy":
        streamer.destroy_workers()
"""


@pytest.mark.parametrize("ending", ["destroy", "left running"])
@pytest.mark.parametrize("kind", ["threaded", "spawn", "fork"])
def test_local_streamers_exit_quietly(kind, ending):
    done = run_script(LOCAL_SCRIPT, kind, ending)
    assert_quiet(done)
    assert done.stdout == "[1, 4, 9] [16]\n"


@pytest.mark.parametrize("kind", ["threaded", "spawn"])
def test_a_streamer_made_in_a_function_and_never_destroyed_exits_quietly(kind):
    # service-streamer's own test shape: the streamer goes out of scope, still running; the
    # collection then must not destroy its dispatcher task while it is pending
    done = run_script("""
        import gc, sys
        from batchserve.compat import Streamer, ThreadedStreamer
        from tests.compat_models import square_or_fail

        def use_one():
            if sys.argv[1] == "threaded":
                streamer = ThreadedStreamer(square_or_fail, batch_size=8, max_latency=0.01)
            else:
                streamer = Streamer(square_or_fail, batch_size=8, worker_num=1, mp_start_method="spawn")
            return streamer.predict([1, 2, 3])

        print(use_one())
        gc.collect()
        print(use_one())
        gc.collect()
    """, kind)
    assert_quiet(done)
    assert done.stdout == "[1, 4, 9]\n[1, 4, 9]\n"


UNGUARDED_SCRIPT = """
from batchserve.compat import Streamer

def square(batch):
    return [x * x for x in batch]

streamer = Streamer(square, batch_size=4, worker_num=2, wait_for_worker_ready=True)
print(streamer.predict([1, 2]))
streamer.destroy_workers()
"""


def test_a_script_without_a_main_guard_fails_with_the_workers_error_instead_of_hanging(tmp_path):
    # the README's "BERT service in 5 minutes", saved as a script: each spawned worker runs the
    # script again and dies in multiprocessing's bootstrapping error
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 60
    raised = done.stderr[done.stderr.rindex("Traceback (most recent call last):"):]  # this process's own
    assert "WorkerDiedError: the workers of 'square' died before they were ready" in raised
    assert "current process has finished its bootstrapping phase" in raised  # the worker's own words
    assert 'under if __name__ == "__main__":' in raised
    assert done.stdout == ""

    guarded = UNGUARDED_SCRIPT.replace("streamer = ", 'if __name__ == "__main__":\n    streamer = ')
    guarded = guarded.replace("\nprint(", "\n    print(").replace("\nstreamer.destroy", "\n    streamer.destroy")
    script.write_text(guarded)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert_quiet(done)
    assert done.stdout == "[1, 4]\n"


def test_a_streamer_whose_workers_are_still_loading_at_exit_exits_quietly():
    done = run_script("""
        from batchserve.compat import Streamer
        from tests.compat_models import EnvReporter
        streamer = Streamer(EnvReporter, batch_size=4, worker_num=2)  # returns before the workers load
        print("constructed")
    """)
    assert_quiet(done)
    assert done.stdout == "constructed\n"


def test_a_stopped_batcher_refuses_calls_at_once_and_exits_quietly():
    done = run_script("""
        import time
        from batchserve import Batcher
        from batchserve.errors import NotReadyError
        batcher = Batcher(lambda xs: [x * 2 for x in xs])
        print(batcher.predict([1, 2]))
        batcher.stop()
        batcher.stop()  # again: nothing to do
        started = time.monotonic()
        try:
            batcher.predict([3])
        except NotReadyError as error:
            print("refused:", error, time.monotonic() - started < 1.0)
    """)
    assert_quiet(done)
    assert done.stdout == "[2, 4]\nrefused: model 'model' was stopped True\n"


REDIS_SCRIPT = """
    import sys, threading
    from batchserve.compat import RedisStreamer, RedisWorker, run_redis_workers_forever
    from tests.redis_models import Scaler, negate

    broker, ending = sys.argv[1:3]
    threading.Thread(
        target=RedisWorker(Scaler, 4, redis_broker=broker, prefix="single", model_init_args=(5,)).run_forever,
        daemon=True,
    ).start()
    threading.Thread(
        target=run_redis_workers_forever, args=(negate, 8, 0.01),
        kwargs={"worker_num": 2, "redis_broker": broker, "prefix": "pool"}, daemon=True,
    ).start()
    single = RedisStreamer(broker, prefix="single", worker_timeout=90)
    pool = RedisStreamer(broker, prefix="pool", worker_timeout=90)
    print(single.predict([1, 2]), pool.submit([3]).result(), pool.predict([4, 5]))
    if ending == "destroy":
        single.destroy_workers()
        pool.destroy_workers()
"""


@needs_redis
@pytest.mark.parametrize("ending", ["destroy", "left running"])
def test_redis_streamers_and_workers_in_threads_exit_quietly(redis_server, ending):
    done = run_script(REDIS_SCRIPT, f"127.0.0.1:{redis_server.port}", ending, timeout=180)
    assert_quiet(done)
    assert done.stdout == "[5, 10] [-3] [-4, -5]\n"
    client = redis_server.client()
    for prefix in ("single", "pool"):  # at exit the workers left (their leases are gone at once)
        assert client.zcard(f"batchserve:{prefix}:model:workers") == 0


MAIN_THREAD_WORKER = """
    import sys
    from batchserve.compat import RedisWorker, run_redis_workers_forever
    from tests.redis_models import Scaler

    broker, kind = sys.argv[1:3]
    if kind == "RedisWorker":
        RedisWorker(Scaler, 4, redis_broker=broker, prefix=kind).run_forever()
    else:
        run_redis_workers_forever(Scaler, 4, worker_num=2, redis_broker=broker, prefix=kind)
"""


@needs_redis
@pytest.mark.parametrize("kind", ["RedisWorker", "run_redis_workers_forever"])
def test_workers_in_the_main_thread_stop_quietly_on_sigterm(redis_server, kind):
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    command = [sys.executable, "-W", "default", "-c", textwrap.dedent(MAIN_THREAD_WORKER), f"127.0.0.1:{redis_server.port}", kind]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_workers(redis_server.client(), "model", 1, prefix=kind, timeout=90)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert not noisy(stderr), stderr
    assert time.monotonic() - started < 30
    assert redis_server.client().zcard(f"batchserve:{kind}:model:workers") == 0
