"""The process backend: placement, supervision, recycling, shutdown, and one copy of the weights."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import threading
import time

import httpx
import pytest

from batchserve import Batcher, DeadlineExceededError, ModelError, WorkerDiedError
from batchserve.backends import ProcessBackend
from batchserve.backends import process as process_module
from batchserve.devices import cpu_count
from batchserve.model import ModelSpec
from batchserve.procinfo import children, state, tree_pss_bytes
from tests.process_fakes import CrashFirstLoad, TorchThreads, die_on, slow_double, whoami


def process_batcher(model, workers: int, **options) -> Batcher:
    batcher_options = {k: options.pop(k) for k in ("max_batch_size", "timeout") if k in options}
    backend = ProcessBackend(ModelSpec(model) if not isinstance(model, ModelSpec) else model, workers=workers, **options)
    return Batcher(backend, max_latency=0.005, **{"max_batch_size": 4, **batcher_options})


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def gone(pid: int) -> bool:
    """Exited (a zombie left to an init that does not reap is exited too)."""
    return state(pid) in (None, "Z")


def worker_children() -> list[int]:
    """This process's children but multiprocessing's resource tracker (it lives as long as we do)."""
    found = []
    for pid in children(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                if b"resource_tracker" in file.read():
                    continue
        except OSError:
            continue
        found.append(pid)
    return found


def spread(batcher: Batcher, calls: int = 64) -> list:
    """Concurrent single-item calls, repeated until every worker has answered some; the outputs."""
    outputs: list = []
    for _ in range(5):
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            outputs += [out[0] for out in pool.map(lambda i: batcher.predict([i]), range(calls))]
        if {_pid(out) for out in outputs} >= set(batcher.backend.worker_pids()):
            break
    return outputs


def _pid(output) -> int:
    return output["pid"] if isinstance(output, dict) else output[2]


# --------------------------------------------------------------------------- placement


def test_four_cpu_workers_all_serve():
    with process_batcher(whoami, 4) as batcher:
        assert batcher.backend.start_method == "fork"
        outputs = spread(batcher)
        assert [out["x"] for out in outputs[:64]] == list(range(64))
        pids = {out["pid"] for out in outputs}
        assert pids == set(batcher.backend.worker_pids()) and len(pids) == 4
        assert os.getpid() not in pids
        assert {out["cuda"] for out in outputs} == {""}  # CPU workers see no GPU
        assert {out["device"] for out in outputs} == {"cpu"}
        assert batcher.backend.describe()["workers_up"] == 4


def test_cuda_devices_round_robin_gpu_zero_included():
    # No GPU is needed: the children only report what they were given.
    with process_batcher(whoami, 4, devices="0,1") as batcher:
        assert batcher.backend.start_method == "spawn"  # GPU workers never fork
        outputs = spread(batcher)
        seen = {out["pid"]: (out["slot"], out["cuda"], out["device"]) for out in outputs}
        by_slot = [seen[pid] for pid in batcher.backend.worker_pids()]
        assert by_slot == [
            ("0", "0", "cuda:0"),
            ("1", "1", "cuda:1"),
            ("2", "0", "cuda:0"),
            ("3", "1", "cuda:1"),
        ]
    assert os.environ.get("BATCHSERVE_DEVICE") is None  # the front's own environment is untouched


def test_torch_threads_per_worker():
    with process_batcher(TorchThreads, 2) as batcher:
        threads = {(torch_threads, omp) for torch_threads, omp, _ in spread(batcher, 16)}
        expected = max(1, cpu_count() // 2)
        assert threads == {(expected, str(expected))}
    with process_batcher(TorchThreads, 2, threads_per_worker=3) as batcher:
        assert {(t, omp) for t, omp, _ in spread(batcher, 16)} == {(3, "3")}


# --------------------------------------------------------------------------- supervision


def test_batch_of_a_dead_worker_is_retried_on_another(tmp_path):
    with process_batcher(die_on, 2) as batcher:
        first = batcher.backend.worker_pids()
        item = ["die-once", str(tmp_path / "died")]
        assert batcher.predict([item, 5]) == [item, 10]
        assert batcher.backend.restarts == 1
        assert wait_until(lambda: batcher.backend.capacity == 2)
        assert len(set(first) & set(batcher.backend.worker_pids())) == 1


def test_batch_that_kills_every_worker_fails_clearly_and_the_pool_recovers():
    with process_batcher(die_on, 2) as batcher:
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"worker process \d+ exited with status 9 running this batch"):
            batcher.predict(["die"], timeout=10)
        assert time.monotonic() - started < 5
        assert batcher.backend.restarts == 2  # tried once, retried once, then failed
        assert batcher.predict([1, 2]) == [2, 4]
        assert wait_until(lambda: batcher.backend.capacity == 2)


def test_sigkill_a_worker_every_half_second_under_load():
    """300 requests from 32 callers while a worker is SIGKILLed every 0.5 s."""
    timeout = 10.0
    workers = 4
    with process_batcher(slow_double, workers, max_batch_size=4, timeout=timeout) as batcher:
        outcomes: list[tuple[str, float]] = []
        lock = threading.Lock()
        numbers = iter(range(300))
        done = threading.Event()

        def caller() -> None:
            while True:
                with lock:
                    number = next(numbers, None)
                if number is None:
                    return
                started = time.monotonic()
                try:
                    result = batcher.predict([number, number + 1])
                    outcome = "ok" if result == [2 * number, 2 * number + 2] else f"wrong: {result}"
                except (WorkerDiedError, DeadlineExceededError) as error:
                    outcome = f"error: {error}"
                except Exception as error:  # noqa: BLE001 - an unclear error fails the test
                    outcome = f"unexpected: {type(error).__name__}: {error}"
                with lock:
                    outcomes.append((outcome, time.monotonic() - started))

        def killer() -> None:
            while not done.wait(0.5):
                pids = batcher.backend.worker_pids()
                if pids:
                    os.kill(random.choice(pids), signal.SIGKILL)
                    kills.append(1)

        kills: list[int] = []
        threads = [threading.Thread(target=caller) for _ in range(32)]
        chaos = threading.Thread(target=killer)
        chaos.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 30)
        done.set()
        chaos.join()

        assert not any(thread.is_alive() for thread in threads), "a caller hangs"
        assert len(outcomes) == 300
        assert len(kills) >= 3
        unclear = [outcome for outcome, _ in outcomes if outcome != "ok" and not outcome.startswith("error: ")]
        assert not unclear, unclear[:5]
        assert all(elapsed < timeout + 1 for _, elapsed in outcomes)
        assert sum(outcome == "ok" for outcome, _ in outcomes) >= 250
        assert wait_until(lambda: batcher.backend.capacity == workers, 15)
        assert batcher.predict([21]) == [42]


def test_workers_are_recycled_after_max_batches():
    with process_batcher(whoami, 1, max_batches=3) as batcher:
        pids = [batcher.predict([i])[0]["pid"] for i in range(12)]
        assert len(set(pids)) >= 3  # 3 or 4 batches each (the limit has 10 % jitter), then a new one
        assert all(run >= 3 for run in _run_lengths(pids)[:-1])
        assert wait_until(lambda: batcher.backend.capacity == 1)


def test_worker_that_dies_at_start_is_restarted_with_backoff(tmp_path):
    marker = tmp_path / "crashed"
    spec = ModelSpec(CrashFirstLoad, kwargs={"marker": str(marker)})
    started = time.monotonic()
    with process_batcher(spec, 1, start_method="spawn") as batcher:
        assert time.monotonic() - started >= process_module.BACKOFF_FIRST
        assert marker.exists() and batcher.backend.restarts == 1
        assert batcher.predict([1, 2]) == [2, 3]


def test_model_that_fails_to_load_fails_start_with_its_message():
    before = set(worker_children())  # other tests' servers (session fixtures) may be running
    batcher = process_batcher("tests.process_fakes:BrokenLoad", 2, start_method="spawn")
    with pytest.raises(ModelError, match="RuntimeError: no weights here"):
        batcher.start_in_thread()
    assert all(gone(pid) for pid in set(worker_children()) - before)


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_workers_that_never_become_ready_fail_start_with_their_own_message(start_method):
    before = set(worker_children())
    batcher = process_batcher(  # no preload: the model dies in each worker, never in this process
        "tests.process_fakes:DiesWhileLoading", 2, start_method=start_method, preload=False, start_timeout=60
    )
    started = time.monotonic()
    with pytest.raises(WorkerDiedError, match="fatal: no accelerator here") as raised:
        batcher.start_in_thread()
    assert time.monotonic() - started < 30  # two tries a worker, not restarts until start_timeout
    assert "exited with status 7" in str(raised.value)
    assert "loading DiesWhileLoading" not in str(raised.value)  # the error, not everything it printed
    assert all(gone(pid) for pid in set(worker_children()) - before)
    batcher.stop()


def test_stop_leaves_no_orphans_or_zombies():
    batcher = process_batcher(whoami, 3)
    batcher.start_in_thread()
    pids = batcher.backend.worker_pids()
    assert len(pids) == 3 and set(pids) <= set(worker_children())
    batcher.stop()
    assert all(state(pid) is None for pid in pids)  # exited and reaped


def test_exception_in_predict_reaches_only_its_caller():
    with process_batcher("tests.fakes:RecordingModel", 2, max_batch_size=8) as batcher:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(batcher.predict, ["poison" if i == 3 else i]) for i in range(16)]
            for i, future in enumerate(futures):
                if i == 3:
                    with pytest.raises(ModelError, match="ValueError: poison item cannot be doubled"):
                        future.result()
                else:
                    assert future.result() == [2 * i]
        assert batcher.backend.restarts == 0


def _run_lengths(values: list) -> list[int]:
    runs, previous = [], object()
    for value in values:
        if value == previous:
            runs[-1] += 1
        else:
            runs.append(1)
        previous = value
    return runs


# --------------------------------------------------------------------------- over HTTP


def test_readyz_reflects_workers_up_and_shutdown_stops_them(start_server):
    server = start_server("--model", "tests.process_fakes:whoami", "--backend", "process", "--workers", "2")
    ready = httpx.get(f"{server.url}/readyz").json()
    described = ready["services"]["models"]["models"]["whoami"]
    assert described["backend"] == "process" and described["workers"] == 2 and described["workers_up"] == 2
    pids = described["pids"]
    assert sorted(pids) == sorted(children(server.process.pid))
    answer = httpx.post(f"{server.url}/models/whoami/predict", json={"inputs": [7]}).json()
    assert answer["outputs"][0]["pid"] in pids
    assert 'batchserve_workers_up{model="whoami"} 2.0' in httpx.get(f"{server.url}/metrics").text

    os.kill(pids[0], signal.SIGKILL)
    assert wait_until(lambda: _workers(server)["restarts"] == 1)
    assert wait_until(lambda: _workers(server)["workers_up"] == 2)
    pids = _workers(server)["pids"]

    server.stop()
    assert server.process.returncode == 0
    assert all(state(pid) is None for pid in pids)


def test_workers_exit_when_the_server_is_killed(start_server):
    server = start_server("--model", "tests.process_fakes:whoami", "--backend", "process", "--workers", "2")
    pids = _workers(server)["pids"]
    server.process.kill()
    server.process.wait()
    assert wait_until(lambda: all(gone(pid) for pid in pids), 10), [state(pid) for pid in pids]


def _workers(server) -> dict:
    return httpx.get(f"{server.url}/readyz").json()["services"]["models"]["models"]["whoami"]


# --------------------------------------------------------------------------- memory


def test_four_forked_workers_share_one_copy_of_the_weights(start_server):
    """Total PSS (front + workers) of 4 workers on the bundled model ≤ 2× that of 1 worker."""
    totals = {}
    for workers in (1, 4):
        server = start_server("--app", "embeddings", "--backend", "process", "--workers", str(workers))
        texts = [f"sentence number {i} about dog walking" for i in range(256)]
        for _ in range(2):  # 256 items = 4 batches of 64 at once: every worker computes
            response = httpx.post(f"{server.url}/v1/embeddings", json={"input": texts}, timeout=60)
            assert response.status_code == 200
        assert len(children(server.process.pid)) == workers
        totals[workers] = tree_pss_bytes(server.process.pid)
        server.stop()
    ratio = totals[4] / totals[1]
    figures = f"1 worker {totals[1] / 2**20:.0f} MiB, 4 workers {totals[4] / 2**20:.0f} MiB, ratio {ratio:.2f}"
    print(f"PSS: {figures}")
    assert ratio <= 2.0, figures


def test_large_inputs_and_outputs_under_uvloop():
    """uvloop (the server's loop) makes watched pipes non-blocking; big messages must still pass."""
    import asyncio

    import numpy as np
    import uvloop

    async def main() -> None:
        async with process_batcher("tests.process_fakes:echo_arrays", 2, max_batch_size=8) as batcher:
            arrays = [np.full(200_000, i, dtype=np.float32) for i in range(32)]  # 800 kB each
            outputs = await asyncio.gather(*(batcher.submit([array]) for array in arrays))
            assert [float(out[0][0]) for out in outputs] == list(range(32))
            assert batcher.backend.restarts == 0

    uvloop.run(main())
