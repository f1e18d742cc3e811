"""User models for the config-file tests (``--model tests.config_models:predict``...): each
answers every input with the size of the batch it ran in, so a client sees each model's
batching; an input ``{"sleep": s}`` makes its batch take ``s`` seconds."""

from __future__ import annotations

import time


def _answer(batch: list) -> list:
    time.sleep(0.02 + max((item.get("sleep", 0) for item in batch if isinstance(item, dict)), default=0))
    return [{"batch": len(batch)} for _ in batch]


def predict(batch: list) -> list:
    """A function model (``small`` in the tests' config file)."""
    return _answer(batch)


class Big:
    """A class model (``big`` in the tests' config file)."""

    def load(self) -> None:
        self.loaded = True

    def predict(self, batch: list) -> list:
        return _answer(batch)
