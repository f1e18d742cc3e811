"""Small models served by `batchserve worker` processes in the redis tests."""

from __future__ import annotations

import os
import time

import numpy as np

from batchserve.compat import ManagedModel


def slow_double(batch: list) -> list:
    """Doubles numbers in 50 ms a batch: slow enough to kill a worker in the middle."""
    time.sleep(0.05)
    return [x * 2 for x in batch]


def negate(batch: list) -> list:
    return [-x for x in batch]


def vectors(batch: list) -> list:
    """Numpy outputs (arrays and scalars) to cross the wire."""
    return [(np.full(3, x, dtype=np.float32), np.int64(x)) for x in batch]


class Scaler(ManagedModel):
    """A service-streamer style model: `init_model(factor)` then `predict`."""

    def init_model(self, factor: int = 1) -> None:
        self.factor = factor

    def predict(self, batch: list) -> list:
        time.sleep(0.01)
        return [x * self.factor for x in batch]


#: the file :func:`record` appends each item it computes to (set in the worker's environment)
RECORD_ENV = "BATCHSERVE_TEST_RECORD"


def record(batch: list) -> list:
    """Doubles numbers, writing each item it computed to the file named by $BATCHSERVE_TEST_RECORD."""
    with open(os.environ[RECORD_ENV], "a", encoding="utf-8") as handle:
        handle.writelines(f"{item}\n" for item in batch)
    return [x * 2 for x in batch]


#: :func:`gated` computes nothing until the file this names exists (set in the worker's environment)
GATE_ENV = "BATCHSERVE_TEST_GATE"


def gated(batch: list) -> list:
    """Doubles numbers once the file named by $BATCHSERVE_TEST_GATE exists (at most 60 s): a worker held busy."""
    give_up = time.monotonic() + 60
    while not os.path.exists(os.environ[GATE_ENV]) and time.monotonic() < give_up:
        time.sleep(0.01)
    return [x * 2 for x in batch]
