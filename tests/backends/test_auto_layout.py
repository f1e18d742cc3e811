"""The layout chosen when --backend is unset, and the cores it counts (affinity, cgroup quota)."""

from __future__ import annotations

import pytest

from batchserve import devices
from batchserve.apps.embeddings import EmbeddingModel
from batchserve.backends.registry import auto_layout
from batchserve.model import ModelSpec
from batchserve.settings import BackendKind, Settings
from tests.fakes import echo

ENCODER = ModelSpec(EmbeddingModel)


@pytest.fixture
def cores(monkeypatch):
    def set_cores(count: int, gpus: int = 0) -> None:
        monkeypatch.setattr(devices, "cpu_count", lambda: count)
        monkeypatch.setattr(devices, "gpu_count", lambda: gpus)

    return set_cores


def test_the_encoder_on_a_multicore_cpu_gets_one_process_per_core(cores):
    cores(2)
    chosen = auto_layout(ENCODER, Settings())
    assert chosen.backend is BackendKind.process and chosen.process.workers == 2
    assert devices.threads_per_worker(chosen.process.workers) == 1
    cores(6)
    assert auto_layout(ENCODER, Settings()).process.workers == 6
    assert auto_layout(ENCODER, Settings.from_options(workers=3)).process.workers == 3  # --workers as given


@pytest.mark.parametrize(
    "why, count, gpus, options",
    [
        ("one core", 1, 0, {}),
        ("a GPU", 2, 1, {}),
        ("several HTTP processes", 2, 0, {"http_workers": 2}),
        ("devices named", 2, 0, {"devices": ["cuda:0"]}),
    ],
)
def test_otherwise_the_encoder_stays_on_the_thread_backend(cores, why, count, gpus, options):
    cores(count, gpus)
    assert auto_layout(ENCODER, Settings.from_options(**options)).backend is BackendKind.thread, why


def test_other_models_stay_on_the_thread_backend(cores):
    cores(8)
    assert auto_layout(ModelSpec(echo), Settings()).backend is BackendKind.thread
    assert Settings().backend is None  # unset means auto; an explicit backend is never replaced
    assert Settings.from_options(backend="thread").backend is BackendKind.thread


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    write(v2 / "cpu.max", "150000 100000\n")
    assert devices.cgroup_cpu_quota(str(v2)) == 1.5
    write(v2 / "cpu.max", "max 100000\n")
    assert devices.cgroup_cpu_quota(str(v2)) is None
    v1 = tmp_path / "v1"
    write(v1 / "cpu" / "cpu.cfs_quota_us", "-1\n")  # this machine: no quota
    write(v1 / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert devices.cgroup_cpu_quota(str(v1)) is None
    write(v1 / "cpu" / "cpu.cfs_quota_us", "200000\n")
    assert devices.cgroup_cpu_quota(str(v1)) == 2.0
    assert devices.cgroup_cpu_quota(str(tmp_path / "none")) is None


def test_cpu_count_is_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(devices, "cgroup_cpu_quota", lambda: 0.5)
    assert devices.cpu_count() == 1  # a fraction of a core is still one
    monkeypatch.setattr(devices, "cgroup_cpu_quota", lambda: 1000.0)
    import os

    assert devices.cpu_count() == len(os.sched_getaffinity(0))  # the quota caps, never adds
