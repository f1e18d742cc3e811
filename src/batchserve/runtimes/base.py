"""The interfaces between a model's users (apps, the generation engine) and what runs it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class EncoderRuntime(ABC):
    """A sentence encoder: texts → one float32 vector each, as the model defines them
    (pooled and, for models that say so, normalized).

    ``encode`` runs its texts as one forward pass (padded to the longest): how a batch is
    split into passes is the batcher's business (see :mod:`batchserve.batching`).
    Texts longer than :attr:`max_length` tokens are truncated, as sentence-transformers does.
    """

    #: short name of the runtime ("torch", "onnx")
    name: str = ""

    def __init__(self, path: str, device: str = "cpu", threads: int | None = None):
        self.path = path
        self.device = device
        self.threads = threads

    @abstractmethod
    def load(self) -> None:
        """Load the model (called once, in the process that will run it)."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Tokens per text, special tokens included; longer texts are truncated."""

    @abstractmethod
    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text after truncation, special tokens included."""

    @abstractmethod
    def encode(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), dimensions]`` float32, in the order of ``texts``."""

    def describe(self) -> dict[str, Any]:
        """Facts for ``/readyz``: runtime, device, precision..."""
        return {"runtime": self.name, "device": self.device}
