"""Models for tests/compat/test_streamer.py, importable by name in spawned worker processes."""

from __future__ import annotations

import os
import time

from batchserve.compat import ManagedModel


class EnvReporter(ManagedModel):
    """Reports which process, slot and GPU ran each item."""

    def init_model(self, delay: float = 0.0) -> None:
        self.delay = delay

    def predict(self, batch: list) -> list:
        time.sleep(self.delay)
        return [
            {
                "item": item,
                "pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "slot": os.environ.get("BATCHSERVE_WORKER"),
                "gpu_id": self.gpu_id,
            }
            for item in batch
        ]


def square_or_fail(batch: list) -> list:
    """Squares numbers; an item "boom" makes the whole batch raise."""
    if "boom" in batch:
        raise ValueError("boom is not a number")
    return [item * item for item in batch]


class FailsToLoad(ManagedModel):
    def init_model(self) -> None:
        raise RuntimeError("weights not found")
