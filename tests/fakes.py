"""Fake models for tests about timing logic and error handling (the real models are elsewhere)."""

from __future__ import annotations

import os
import threading
import time


class RecordingModel:
    """Doubles numbers after a fixed cost per batch; records every batch it saw."""

    def __init__(self, cost: float = 0.01, per_item: float = 0.0):
        self.cost = cost
        self.per_item = per_item
        self.batches: list[list] = []
        self.lock = threading.Lock()

    def predict(self, batch: list) -> list:
        with self.lock:
            self.batches.append(list(batch))
        time.sleep(self.cost + self.per_item * len(batch))
        for item in batch:
            if item == "poison":
                raise ValueError("poison item cannot be doubled")
        return [item * 2 for item in batch]

    @property
    def seen(self) -> list:
        return [item for batch in self.batches for item in batch]


def double(batch: list) -> list:
    """A plain function model for `--model tests.fakes:double`."""
    time.sleep(0.005)
    return [x * 2 for x in batch]


class Greeter:
    """A class model with load(), for `--model tests.fakes:Greeter`."""

    def load(self) -> None:
        self.greeting = "hello"
        self.pid = os.getpid()

    def predict(self, batch: list) -> list:
        time.sleep(0.005)
        return [{"text": f"{self.greeting} {name}", "batch_size": len(batch)} for name in batch]


def wrong_count(batch: list) -> list:
    return batch[:-1] if len(batch) > 1 else []


def slow(batch: list) -> list:
    """Half a second per batch: keeps the queue full for overload and deadline tests."""
    time.sleep(0.5)
    return list(batch)


def fragile(batch: list) -> list:
    """Fails on the input "boom" with a message the caller must see."""
    if "boom" in batch:
        raise RuntimeError("cannot handle boom")
    time.sleep(0.002)
    return [str(x).upper() for x in batch]


def batch_sizes(batch: list) -> list:
    """Answers each input with the size of the batch it ran in."""
    time.sleep(0.02)
    return [len(batch) for _ in batch]


class SlowLoader:
    """Takes two seconds to load: /readyz must say 503 meanwhile."""

    def load(self) -> None:
        time.sleep(2.0)

    def predict(self, batch: list) -> list:
        return list(batch)


def echo(batch: list) -> list:
    """Returns every input unchanged: any JSON value is a valid input."""
    return list(batch)


def fixed_cost(batch: list) -> list:
    """100 ms per batch whatever its size: capacity is max_batch_size / 0.1 requests per second."""
    time.sleep(0.1)
    return list(batch)


def sluggish(batch: list) -> list:
    """Two seconds per batch: a queue that stays full long enough to observe on a busy machine."""
    time.sleep(2.0)
    return list(batch)


class TokenBudgeted:
    """Declares a token budget (words): its batches run as length-grouped passes."""

    max_batch_tokens = 256

    @staticmethod
    def batch_length(text: str) -> int:
        return len(text.split())

    def predict(self, batch: list) -> list:
        return [len(text) for text in batch]
