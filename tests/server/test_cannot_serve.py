"""A server that cannot serve says so and exits, through the real `batchserve` command line:
a model whose load() raises stops uvicorn (exit 3) and gunicorn (the master exits 3 too, whether
the master's preload or a worker's start failed); a device that does not exist is refused
before any worker starts (exit 2).  The reason is on stderr, without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import PYTHONPATH, ROOT, free_port


def batchserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": PYTHONPATH}
    command = [sys.executable, "-m", "batchserve.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def serve(*args: str) -> subprocess.CompletedProcess:
    return batchserve("serve", "--port", str(free_port()), *args)


def assert_says_without_traceback(result: subprocess.CompletedProcess, *phrases: str) -> None:
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


BROKEN = "tests.process_fakes:BrokenLoad"  # load() raises RuntimeError("no weights here")


def test_a_model_that_fails_to_load_stops_the_server():
    result = serve("--model", BROKEN)
    assert result.returncode == 3
    assert_says_without_traceback(result, "batchserve: cannot serve: service models failed to start: RuntimeError: no weights here")


def test_under_gunicorn_a_failed_preload_stops_the_master_before_any_worker():
    result = serve("--model", BROKEN, "--http-workers", "2", "--log-level", "info")
    assert result.returncode == 3
    assert_says_without_traceback(result, "batchserve: cannot serve: service models failed to load: RuntimeError: no weights here")
    assert "Booting worker" not in result.stderr  # gunicorn logs it at info for each fork


def test_under_gunicorn_a_worker_that_fails_to_start_stops_the_master(tmp_path):
    """The generation model loads in each HTTP worker (not in the master): a worker that
    cannot load it exits with gunicorn's boot error, and the master stops instead of replacing it."""
    missing = str(tmp_path / "missing")
    result = serve("--app", "generation", "--generation-model", missing, "--http-workers", "2", "--log-level", "info")
    assert result.returncode == 3
    assert_says_without_traceback(
        result, "batchserve: cannot serve: service generation failed to start: FileNotFoundError", "Worker failed to boot"
    )
    assert "Booting worker" in result.stderr


def _missing_gpu() -> str:
    """A CUDA device this machine does not have (one past the last)."""
    import torch

    return f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_device_that_does_not_exist_is_refused_before_any_worker_starts(command):
    gpu = _missing_gpu()
    if command == "serve":
        result = serve("--backend", "process", "--devices", f"cpu,{gpu}")
    else:  # refused before it connects to Redis (nothing listens on port 1)
        result = batchserve("worker", "--redis-url", "redis://127.0.0.1:1", "--devices", gpu, timeout=60)
    assert result.returncode == 2
    assert_says_without_traceback(result, f"batchserve: no device {gpu} on this machine", "the devices here: cpu")


def test_cpu_devices_are_checked_without_importing_torch():
    check = "import sys; from batchserve.devices import check_devices; print(check_devices(['cpu']), 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["['cpu']", "False"], result.stderr


def test_a_second_boot_error_while_the_master_halts_is_reaped_quietly():
    """gunicorn's master halts on a worker's boot error; if another worker exits with one while
    it halts (reaped inside halt's stop()), gunicorn would raise its HaltServer out of halt: a
    traceback and exit status 1.  The config's on_starting hook reaps it quietly instead."""
    from gunicorn.errors import HaltServer

    from batchserve.server.gunicorn_config import on_starting

    class Master:  # the part of gunicorn's Arbiter the hook wraps
        def __init__(self):
            self.boot_errors, self.exit_status = 2, None

        def reap_workers(self):
            if self.boot_errors:
                self.boot_errors -= 1
                raise HaltServer("Worker failed to boot.", 3)

        def halt(self, reason=None, exit_status=0):
            self.reap_workers()  # as gunicorn's stop() does, waiting for the other workers
            self.exit_status = exit_status

    master = Master()
    on_starting(master)
    with pytest.raises(HaltServer):  # the first one: the main loop catches it and halts
        master.reap_workers()
    master.halt("Worker failed to boot.", 3)
    assert master.exit_status == 3 and master.boot_errors == 0
