"""The torch encoder runtime: the model as sentence-transformers loads and runs it."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from batchserve.runtimes.base import EncoderRuntime


class TorchEncoder(EncoderRuntime):
    """sentence-transformers on ``device`` (``cpu``, ``cuda``, ``cuda:N``), float32."""

    name = "torch"

    def __init__(self, path: str, device: str = "cpu", threads: int | None = None):
        super().__init__(path, device, threads)
        self.model = None

    def load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        self.model = SentenceTransformer(self.path, device=self.device, local_files_only=True)

    @property
    def max_length(self) -> int:
        return int(self.model.max_seq_length)

    def token_counts(self, texts: list[str]) -> list[int]:
        encoded = self.model.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [len(ids) for ids in encoded]

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=max(len(texts), 1), convert_to_numpy=True)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "device": str(self.model.device) if self.model else self.device, "precision": "fp32"}
