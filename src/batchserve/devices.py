"""Devices and threads for worker processes.

A worker is placed on one device: ``cpu``, or ``cuda:N``.  Each worker process gets

* ``CUDA_VISIBLE_DEVICES`` — ``N`` for ``cuda:N`` (so the model sees its GPU as ``cuda:0``),
  empty for ``cpu`` — set before the child imports a framework;
* ``BATCHSERVE_DEVICE`` — the device it was given (``cpu`` or ``cuda:N``), which a model can
  read with :func:`worker_device`;
* ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` and torch's thread count — its share of the cores.

Nothing here imports torch at import time: a model that never uses it never pays for it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from typing import Iterable, Iterator

DEVICE_ENV = "BATCHSERVE_DEVICE"
WORKER_ENV = "BATCHSERVE_WORKER"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

# os.environ is process-wide: changes that a child must inherit are made under this lock.
_ENV_LOCK = threading.Lock()


def parse_devices(devices: str | Iterable[object]) -> list[str]:
    """``"cpu"``, ``"cuda:0,cuda:1"``, ``"0,1"``, ``(0, 1)``, ``["cuda:0", "1"]`` → ``["cpu"]``, ``["cuda:0", "cuda:1"]``…"""
    if isinstance(devices, str):
        devices = [devices]
    parts = [part for entry in devices for part in str(entry).split(",")]
    parsed = [_parse_one(part) for part in parts if part.strip()]
    if not parsed:
        raise ValueError("no device given; use cpu, cuda:N or a comma-separated list")
    return parsed


def _parse_one(device: object) -> str:
    text = str(device).strip().lower()
    if text == "cpu":
        return "cpu"
    if text == "cuda" or text == "gpu":
        return "cuda:0"
    index = text.removeprefix("cuda:").removeprefix("gpu:")
    if index.isdigit():
        return f"cuda:{int(index)}"
    raise ValueError(f"unknown device {device!r}; use cpu, cuda:N or a GPU index")


def check_devices(devices: str | Iterable[object]) -> list[str]:
    """The parsed devices if each exists on this machine, else a ValueError naming those that do.

    torch is imported (to count CUDA devices) only when a GPU is asked for.
    """
    parsed = parse_devices(devices)
    gpus = [device for device in parsed if is_gpu(device)]
    if not gpus:
        return parsed
    count, why = _cuda_devices()
    missing = [device for device in gpus if int(device.partition(":")[2]) >= count]
    if missing:
        present = ", ".join(["cpu"] + [f"cuda:{index}" for index in range(count)])
        raise ValueError(f"no device {', '.join(missing)} on this machine{why}; the devices here: {present}")
    return parsed


def _cuda_devices() -> tuple[int, str]:
    """How many CUDA devices torch sees, and why none when it sees none."""
    try:
        import torch
    except ImportError:
        return 0, " (torch is not installed)"
    count = torch.cuda.device_count()
    if count == 0 and torch.version.cuda is None:
        return 0, " (this torch is built without CUDA)"
    return count, ""


def gpu_count() -> int:
    """CUDA devices torch sees; 0 without importing torch when it is not installed or the
    machine has no GPU device node (``/dev/nvidia*``, ROCm's ``/dev/kfd``)."""
    import glob
    import importlib.util

    if not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")) and sys.platform.startswith("linux"):
        return 0
    try:
        if importlib.util.find_spec("torch") is None:
            return 0
    except (ImportError, ValueError):
        return 0
    return _cuda_devices()[0]


def is_gpu(device: str) -> bool:
    return device.startswith("cuda:")


def visible_devices(device: str) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value for a worker on ``device``."""
    return device.partition(":")[2] if is_gpu(device) else ""


def cpu_count() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota if one is set
    (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; a fraction rounds up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time the cgroup quota allows (quota / period), or None when unlimited or unknown."""
    v2 = _read(os.path.join(root, "cpu.max"))
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return _ratio(quota, period or "100000")
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = os.path.join(root, controller)
        v1 = _read(os.path.join(base, "cpu.cfs_quota_us"))
        if v1 is not None:
            return _ratio(v1, _read(os.path.join(base, "cpu.cfs_period_us")) or "100000")
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def threads_per_worker(workers: int, requested: int | None = None) -> int:
    """Threads for each of ``workers`` processes computing at once on the CPU (every
    process that computes: HTTP processes x model workers), cores // workers unless told."""
    if requested:
        return requested
    return max(1, cpu_count() // max(workers, 1))


def process_threads() -> int:
    """Threads a runtime of this process uses when not told: ``OMP_NUM_THREADS`` when set (the
    process backend gives each worker its share of the cores there, and gunicorn's HTTP
    workers set theirs), else every core this process may use."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(given) if given.isdigit() and int(given) > 0 else cpu_count()


def share_cores(threads: int) -> None:
    """Give this process ``threads`` threads for every runtime: torch now (if imported), and
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` for the runtimes that start later (ONNX Runtime,
    llama.cpp, torch imported later: :func:`process_threads`).  For a process about to serve,
    such as a gunicorn HTTP worker just forked."""
    os.environ.update({name: str(threads) for name in THREAD_ENV})
    set_torch_threads(threads)


def worker_env(device: str, slot: int, threads: int) -> dict[str, str]:
    """Environment variables a worker on ``device`` must have before it imports a framework."""
    env = {
        "CUDA_VISIBLE_DEVICES": visible_devices(device),
        DEVICE_ENV: device,
        WORKER_ENV: str(slot),
    }
    env.update({name: str(threads) for name in THREAD_ENV})
    return env


def worker_device() -> str | None:
    """The device the process backend gave this worker (``cpu``, ``cuda:N``), or None.

    Under ``CUDA_VISIBLE_DEVICES`` the worker's GPU is ``cuda:0`` inside the process; see
    :func:`torch_device`.
    """
    return os.environ.get(DEVICE_ENV) or None


def torch_device() -> str | None:
    """The torch device string for this worker (``cpu`` or ``cuda``), or None outside workers."""
    device = worker_device()
    if device is None:
        return None
    return "cuda" if is_gpu(device) else "cpu"


def pick_torch_device() -> str:
    """Where a torch model of this process should run: the device the process backend gave
    this worker, else the first GPU torch sees, else the CPU."""
    placed = torch_device()
    if placed is not None:
        return placed
    import torch  # only for models that run on torch anyway

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a moment (a spawned child inherits them), then restore."""
    with _ENV_LOCK:
        saved = {name: os.environ.get(name) for name in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def set_torch_threads(threads: int) -> None:
    """Set torch's intra-op threads, if torch is already imported (never imports it)."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(threads)


@contextlib.contextmanager
def fork_safe_loading() -> Iterator[None]:
    """Load a model in a process that will fork: CPU only, one torch thread.

    A multithreaded torch op (OpenMP) in the parent before ``fork`` leaves the children's
    thread pool broken, and a CUDA context does not survive ``fork``.  So the model is
    loaded with GPUs hidden and one thread; each child then sets its own thread count.
    """
    set_torch_threads(1)  # torch imported earlier: no new OpenMP team from here on
    with environment({"CUDA_VISIBLE_DEVICES": "", DEVICE_ENV: "cpu", **dict.fromkeys(THREAD_ENV, "1")}):
        yield
    set_torch_threads(1)  # torch imported while loading: read the variables above; make sure
