"""batchserve.devices: device lists, what a worker's environment gets, thread shares."""

from __future__ import annotations

import os
import threading

import pytest

from batchserve import devices
from batchserve.devices import (
    DEVICE_ENV,
    THREAD_ENV,
    WORKER_ENV,
    check_devices,
    environment,
    fork_safe_loading,
    parse_devices,
    threads_per_worker,
    torch_device,
    visible_devices,
    worker_device,
    worker_env,
)


@pytest.mark.parametrize(
    "given, parsed",
    [
        ("cpu", ["cpu"]),
        ("CPU", ["cpu"]),
        ("cuda", ["cuda:0"]),
        ("gpu", ["cuda:0"]),
        ("cuda:1", ["cuda:1"]),
        ("gpu:2", ["cuda:2"]),
        ("0,1", ["cuda:0", "cuda:1"]),
        ("cuda:0, cuda:1", ["cuda:0", "cuda:1"]),
        ("cuda:01", ["cuda:1"]),
        ((0, 1), ["cuda:0", "cuda:1"]),
        (["cuda:0", "1"], ["cuda:0", "cuda:1"]),
        (["cuda:0,cuda:1", "cpu"], ["cuda:0", "cuda:1", "cpu"]),  # as --devices gives them, repeated or not
        ("cpu,,cpu,", ["cpu", "cpu"]),
    ],
)
def test_parse_devices_forms(given, parsed):
    assert parse_devices(given) == parsed


@pytest.mark.parametrize("given", ["tpu", "cuda:x", "cuda:-1", "0.5", "mps"])
def test_unknown_devices_are_refused_by_name(given):
    with pytest.raises(ValueError, match=f"unknown device {given!r}"):
        parse_devices(given)


@pytest.mark.parametrize("given", ["", ",", [], [" "]])
def test_no_device_is_refused(given):
    with pytest.raises(ValueError, match="no device given"):
        parse_devices(given)


def test_check_devices_accepts_the_cpu_and_refuses_a_gpu_that_is_not_here():
    assert check_devices("cpu,cpu") == ["cpu", "cpu"]
    with pytest.raises(ValueError, match=r"no device cuda:99 on this machine.*the devices here: cpu"):
        check_devices(["cpu", "cuda:99"])


def test_a_worker_environment_names_its_device_slot_and_threads():
    gpu = worker_env("cuda:3", slot=5, threads=2)
    assert gpu == {"CUDA_VISIBLE_DEVICES": "3", DEVICE_ENV: "cuda:3", WORKER_ENV: "5",
                   **{name: "2" for name in THREAD_ENV}}
    cpu = worker_env("cpu", slot=0, threads=4)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu[DEVICE_ENV] == "cpu"  # a CPU worker sees no GPU
    assert {cpu[name] for name in THREAD_ENV} == {"4"}
    assert (visible_devices("cuda:0"), visible_devices("cpu")) == ("0", "")


def test_threads_per_worker_shares_the_cores(monkeypatch):
    monkeypatch.setattr(devices, "cpu_count", lambda: 8)
    assert [threads_per_worker(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]  # at least one each
    assert threads_per_worker(4, requested=3) == 3  # told: as told
    assert threads_per_worker(0) == 8


def test_cpu_count_is_what_this_process_may_use():
    assert 1 <= devices.cpu_count() <= (os.cpu_count() or 1)


def test_environment_sets_for_a_moment_and_restores(monkeypatch):
    monkeypatch.setenv("BATCHSERVE_TEST_KEPT", "before")
    monkeypatch.delenv("BATCHSERVE_TEST_NEW", raising=False)
    with environment({"BATCHSERVE_TEST_KEPT": "during", "BATCHSERVE_TEST_NEW": "1"}):
        assert os.environ["BATCHSERVE_TEST_KEPT"] == "during" and os.environ["BATCHSERVE_TEST_NEW"] == "1"
    assert os.environ["BATCHSERVE_TEST_KEPT"] == "before" and "BATCHSERVE_TEST_NEW" not in os.environ
    with pytest.raises(RuntimeError):
        with environment({"BATCHSERVE_TEST_KEPT": "during"}):
            raise RuntimeError("a failed start")
    assert os.environ["BATCHSERVE_TEST_KEPT"] == "before"  # restored on errors too


def test_environment_changes_do_not_interleave_between_threads():
    """Two backends starting workers at once each see only their own values while inside."""
    seen: list[bool] = []

    def start(value: str) -> None:
        with environment({"BATCHSERVE_TEST_SLOT": value}):
            threading.Event().wait(0.05)
            seen.append(os.environ["BATCHSERVE_TEST_SLOT"] == value)

    threads = [threading.Thread(target=start, args=(str(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [True] * 4 and "BATCHSERVE_TEST_SLOT" not in os.environ


def test_a_worker_reads_the_device_it_was_given(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert worker_device() is None and torch_device() is None  # not in a worker
    monkeypatch.setenv(DEVICE_ENV, "cuda:1")
    assert worker_device() == "cuda:1" and torch_device() == "cuda"  # its GPU is cuda:0 inside
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert torch_device() == "cpu"


@pytest.fixture
def torch_threads_kept():
    """fork_safe_loading leaves torch on one thread (the process is about to fork): undo that."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_fork_safe_loading_hides_gpus_and_restores_the_environment(monkeypatch, torch_threads_kept):
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    for name in THREAD_ENV:
        monkeypatch.setenv(name, "8")
    with fork_safe_loading():
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and os.environ[DEVICE_ENV] == "cpu"
        assert {os.environ[name] for name in THREAD_ENV} == {"1"}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1" and DEVICE_ENV not in os.environ
    assert {os.environ[name] for name in THREAD_ENV} == {"8"}
    assert torch.get_num_threads() == 1  # no OpenMP team of many threads left to break forked children
