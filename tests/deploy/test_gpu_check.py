"""`make gpu-check` (benchmarks/gpu_check.py) on a machine without a GPU: it says so and exits 0,
and its checks run with the CPU standing in for the GPU (the comparisons CPU against CPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import PYTHONPATH, ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # the process backend's spawned workers import its probe by this name
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(_cuda(), reason="this host has CUDA: the script would run its checks")
def test_without_cuda_it_says_so_and_exits_0():
    done = _run()
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("SKIP all: no CUDA on this host ("), done.stdout


def test_embeddings_comparison_passes_within_and_fails_past_the_tolerance(monkeypatch):
    module = _load()
    result = module.check_embeddings("cpu")
    assert result.status == "PASS", result.line()
    assert "max |difference| to the CPU 0.00e+00" in result.reason
    monkeypatch.setattr(module, "TOLERANCE", -1.0)  # no difference is small enough: the check must fail
    failed = module.check_embeddings("cpu")
    assert failed.status == "FAIL" and "> -1.0" in failed.reason, failed.line()


def test_a_check_that_raises_is_one_fail_line(capsys, monkeypatch):
    module = _load()

    def broken(device):
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(module, "CHECKS", [broken])
    results = module.run_checks("cpu")
    assert [result.status for result in results] == ["FAIL"]
    line = capsys.readouterr().out.strip()
    assert line.startswith("FAIL broken: RuntimeError: CUDA error: no kernel image is available"), line


@pytest.mark.slow
def test_every_check_runs_with_the_cpu_standing_in():
    """The whole script, --device cpu: two spawned workers (probe and embeddings), the engine on
    the torch runtime; each check prints one line; exit 0."""
    done = _run("--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    statuses = {line.split()[1].rstrip(":"): line.split()[0] for line in lines[:-1]}
    assert statuses == {
        "cuda": "SKIP", "process-spawn": "PASS", "process-embeddings": "PASS", "embeddings": "PASS",
        "generation": "PASS", "two-gpus": "SKIP", "image": "SKIP",
    }, done.stdout
    assert lines[-1].startswith("PASS gpu-check on cpu: 6 of 6"), done.stdout
