"""Models for the process-backend tests: each tells which worker process ran it."""

from __future__ import annotations

import os
import time
from pathlib import Path


def whoami(batch: list) -> list:
    """Each output names the process that computed it and what that process was given."""
    time.sleep(0.02)  # long enough that concurrent batches spread over the workers
    return [
        {
            "x": x,
            "pid": os.getpid(),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": os.environ.get("BATCHSERVE_DEVICE"),
            "slot": os.environ.get("BATCHSERVE_WORKER"),
        }
        for x in batch
    ]


def slow_double(batch: list) -> list:
    """0.1 s a batch: long enough to be killed in the middle of one."""
    time.sleep(0.1)
    return [x * 2 for x in batch]


def die_on(batch: list) -> list:
    """``"die"`` kills the worker every time; ``("die-once", path)`` only while ``path`` is absent."""
    for item in batch:
        if item == "die":
            os._exit(9)
        if isinstance(item, list) and item[0] == "die-once":
            marker = Path(item[1])
            if not marker.exists():
                marker.touch()
                os._exit(9)
    return [item if isinstance(item, list) else item * 2 for item in batch]


class TorchThreads:
    """Imports torch while loading; reports the worker's torch thread count."""

    def load(self) -> None:
        import torch

        self.torch = torch

    def predict(self, batch: list) -> list:
        return [(self.torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.getpid()) for _ in batch]


class CrashFirstLoad:
    """Its first load (in any process) kills the process; later loads succeed."""

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def load(self) -> None:
        if not self.marker.exists():
            self.marker.write_text(str(time.monotonic()))
            os._exit(7)

    def predict(self, batch: list) -> list:
        return [x + 1 for x in batch]


class BrokenLoad:
    def load(self) -> None:
        raise RuntimeError("no weights here")

    def predict(self, batch: list) -> list:
        return batch


class WhoLoaded:
    """For gunicorn: which process loaded the model, and which one serves it."""

    def load(self) -> None:
        self.loaded_in = os.getpid()

    def predict(self, batch: list) -> list:
        return [{"loaded_in": self.loaded_in, "served_by": os.getpid(), "x": x} for x in batch]


def echo_arrays(batch: list) -> list:
    """Returns each (large) array plus one: big messages both ways."""
    return [array + 1 - 1 for array in batch]


class DiesWhileLoading:
    """Says why on stderr, then its process dies before it is ready, every time."""

    def load(self) -> None:
        # on the file descriptor: under pytest a forked worker's sys.stderr is pytest's capture file
        os.write(2, b"loading DiesWhileLoading\nfatal: no accelerator here\n")
        os._exit(7)

    def predict(self, batch: list) -> list:
        return batch
