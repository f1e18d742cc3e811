"""The torch causal-LM runtime: a Hugging Face model over a left-padded KV row cache.

The live sequences are the rows of one :class:`~batchserve.runtimes.torch.kv.RowCache`
(left-padded, one position per row).  Prefill runs the new prompts as one left-padded
pass and merges their cache under the running rows; forks and releases only change which
physical row each sequence reads (``_layout``), so a step's forks, releases and row order
become one ``select`` of the cache, done right before the next pass that needs it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from batchserve.runtimes.base import CausalLM
from batchserve.runtimes.torch.kv import RowCache
from batchserve.runtimes.torch.loading import load_causal_lm
from batchserve.runtimes.torch.scoring import sequence_logprobs


class TorchCausalLM(CausalLM):
    """A Hugging Face causal LM (float32) on ``cpu``, ``cuda`` or ``cuda:N``."""

    name = "torch"

    def __init__(self, model, tokenizer, model_name: str = "model", load_info: dict[str, Any] | None = None):
        self.model = model
        self._tokenizer = tokenizer
        self.model_name = model_name
        self.load_info = dict(load_info or {})
        self.device = next(model.parameters()).device
        self._max_positions = _max_positions(model.config)
        self._stop_tokens = _stop_tokens(model, tokenizer)
        self.pad_token = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._stop_tokens, default=0)
        self._cache: RowCache | None = None
        self._layout: dict[int, int] = {}  # sequence id -> its row in the cache (rows may repeat)
        self._lengths: dict[int, int] = {}  # sequence id -> tokens so far (its next position)

    @classmethod
    def load(
        cls,
        path: str | None = None,
        cache_dir: str | None = None,
        device: str = "cpu",
        max_sequences: int = 32,
        threads: int | None = None,
        prefix_cache_tokens: int = 0,
    ) -> "TorchCausalLM":
        """``max_sequences`` is not needed (the row cache grows with the batch); ``threads`` sets
        torch's intra-op threads, process-wide (every torch model of the process); there is no
        prefix cache (``prefix_cache_tokens`` is ignored)."""
        if threads:
            torch.set_num_threads(threads)
        loaded = load_causal_lm(path, cache_dir, device=device)
        info = {
            "path": loaded.path,
            "load_seconds": round(loaded.load_seconds, 3),
            "dequantize_seconds": None if loaded.converted_seconds is None else round(loaded.converted_seconds, 3),
        }
        return cls(loaded.model, loaded.tokenizer, loaded.name, info)

    @property
    def max_positions(self) -> int:
        return self._max_positions

    @property
    def stop_tokens(self) -> set[int]:
        return self._stop_tokens

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def live(self) -> list[int]:
        return list(self._layout)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "device": str(self.device), "precision": "fp32"}

    # ---------------------------------------------------------------- sequences

    def prefill(self, seq_ids: list[int], prompts: list[list[int]]) -> torch.Tensor:
        already = [seq for seq in seq_ids if seq in self._layout]
        if already or len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"sequences {already or seq_ids} are live already")
        logits, cache = self._forward_prompts(prompts)  # may fail: nothing changed yet
        if self._cache is None or not self._layout:
            self._cache, self._layout, first_row = cache, {}, 0
        else:
            self._materialize(list(self._layout))
            first_row = self._cache.rows
            self._cache.merge(cache)  # the new rows go below the running ones
        for row, (seq, ids) in enumerate(zip(seq_ids, prompts)):
            self._layout[seq] = first_row + row
            self._lengths[seq] = len(ids)
        return logits

    def fork(self, seq_id: int, new_ids: list[int]) -> None:
        if seq_id not in self._layout:
            raise KeyError(f"sequence {seq_id} is not live")
        for seq in new_ids:
            if seq in self._layout:
                raise ValueError(f"sequence {seq} is live already")
            self._layout[seq] = self._layout[seq_id]
            self._lengths[seq] = self._lengths[seq_id]

    def decode(self, seq_ids: list[int], tokens: list[int]) -> torch.Tensor:
        if len(seq_ids) != len(self._layout) or set(seq_ids) != set(self._layout):
            raise ValueError("decode takes every live sequence, each once")
        self._materialize(seq_ids)
        input_ids = torch.tensor([[token] for token in tokens], device=self.device)
        positions = torch.tensor([[self._lengths[seq]] for seq in seq_ids], device=self.device)
        mask = self._cache.extend_mask()
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self._cache.cache,
            use_cache=True,
        )
        for seq in seq_ids:
            self._lengths[seq] += 1
        return output.logits[:, -1, :]

    def release(self, seq_ids: list[int]) -> None:
        for seq in seq_ids:
            self._layout.pop(seq, None)
            self._lengths.pop(seq, None)
        if not self._layout:
            self._cache = None

    def clear(self) -> None:
        self._cache, self._layout, self._lengths = None, {}, {}

    def _materialize(self, order: list[int]) -> None:
        """Make row ``i`` of the cache hold sequence ``order[i]`` (one select, if anything changed)."""
        rows = [self._layout[seq] for seq in order]
        if rows != list(range(self._cache.rows)):
            self._cache.select(rows)
        self._layout = {seq: row for row, seq in enumerate(order)}

    def _forward_prompts(self, prompts: list[list[int]]) -> tuple[torch.Tensor, RowCache]:
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        output = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1, :], RowCache(cache, mask.to(self.device))

    # ---------------------------------------------------------------- scoring

    def score_passes(self, sequences: list[list[int]], deadline: float | None = None):
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        return sequence_logprobs(self.model, sequences, pad, deadline)

    @torch.inference_mode()
    def next_logits(self, ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([ids], device=self.device)
        return self.model(input_ids=input_ids, logits_to_keep=1).logits[0, -1]


def _max_positions(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _stop_tokens(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the generation config's and the tokenizer's."""
    stops: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            stops.add(value)
        elif value:
            stops.update(value)
    return stops
