"""The torch runtime's scoring: the log-probability of each token sequence, all positions.

Infill scores many candidate texts that differ only around a mask, often for several
requests at once.  The common first tokens of each text's candidates (the text before the
mask, often most of it) run through the model once; each candidate's remaining tokens then
run on a copy of that shared KV cache.  The scores are
those of running every text whole.

Memory stays bounded whatever the length of the texts: tokens go through the model a
slice of columns at a time (the KV cache carries the context), so the logits held at once
(rows x tokens x vocabulary, float32) stay within :data:`LOGITS_BYTES`, and the copies of
the shared cache within :data:`CACHE_COPY_BYTES`.  Without that, 48 candidate fills of a
long text took gigabytes.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from batchserve.errors import DeadlineExceededError
from batchserve.runtimes.base import prefix_groups

LOGITS_BYTES = 2**26  # 64 MiB
CACHE_COPY_BYTES = 2**26
FLOAT_BYTES = 4
#: fewest shared first tokens that sequences run once for all of them
MIN_SHARED_TOKENS = 4

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def sequence_logprobs(model, encoded: list[list[int]], pad: int, deadline: float | None = None):
    """A generator yielding after each pass, returning the sum of ``log p(token | tokens
    before it)`` over each sequence (its first token is given).

    Sequences go in groups by their first tokens (:func:`~batchserve.runtimes.base.prefix_groups`):
    each group's shared prefix runs once, then its members' remaining tokens on copies of
    that cache.  Past ``deadline`` (``time.monotonic()``) no further pass is run: the call
    raises :class:`DeadlineExceededError`, and the model is free for other work.
    """
    scorer = _Scorer(model, pad, deadline)
    scores = [0.0] * len(encoded)
    for shared, members in prefix_groups(encoded, MIN_SHARED_TOKENS):
        with torch.inference_mode():  # per pass: a generator's frames leave and come back
            prefix_scores, after_prefix, layers = scorer.score([encoded[members[0]][:shared]], None, [])
        yield
        rests = [encoded[index][shared:] for index in members]
        rows_per_group = scorer.rows_per_group(layers)
        for start in range(0, len(rests), rows_per_group):
            with torch.inference_mode():
                group_scores, _, _ = scorer.score(rests[start : start + rows_per_group], after_prefix, layers)
            for index, score in zip(members[start : start + rows_per_group], (group_scores + prefix_scores[0]).tolist()):
                scores[index] = score
            yield
    return scores


class _Scorer:
    """Right-padded rows of token ids, scored a slice of columns at a time."""

    def __init__(self, model, pad: int, deadline: float | None):
        self.model = model
        self.pad = pad
        self.deadline = deadline
        self.device = next(model.parameters()).device
        self.vocabulary = model.get_output_embeddings().weight.shape[0]

    def rows_per_group(self, layers: Layers) -> int:
        """Rows scored together: each holds a copy of the shared cache and a column of logits."""
        by_logits = LOGITS_BYTES // (self.vocabulary * FLOAT_BYTES)
        cache_bytes = sum((keys.numel() + values.numel()) * keys.element_size() for keys, values in layers)
        by_cache = CACHE_COPY_BYTES // cache_bytes if cache_bytes else by_logits
        return max(1, min(by_cache, by_logits))

    def score(
        self, rows: list[list[int]], first_logprobs: torch.Tensor | None, past: Layers
    ) -> tuple[torch.Tensor, torch.Tensor | None, Layers]:
        """Each row's summed log-probabilities after ``past`` (a cache of one row, repeated).

        ``first_logprobs`` scores each row's first token (None: it is given, not scored).
        Returns the sums, the log-probabilities of the token after the last column, and
        the cache as it is after the rows.
        """
        input_ids, mask = _right_padded(rows, self.pad)
        count, width = input_ids.shape
        if width == 0:
            return torch.zeros(count), first_logprobs, past
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        past_length = past[0][0].shape[2] if past else 0
        cache = DynamicCache(
            ddp_cache_data=[(keys.repeat(count, 1, 1, 1), values.repeat(count, 1, 1, 1)) for keys, values in past]
        ) if past else DynamicCache(config=self.model.config)
        columns = max(1, LOGITS_BYTES // (count * self.vocabulary * FLOAT_BYTES))
        totals = torch.zeros(count, device=self.device)
        previous = None if first_logprobs is None else first_logprobs.expand(count, -1)
        for start in range(0, width, columns):
            self._check_deadline()
            end = min(start + columns, width)
            piece = input_ids[:, start:end]
            logits = self.model(
                input_ids=piece,
                attention_mask=torch.cat([mask.new_ones(count, past_length), mask[:, :end]], dim=1),
                position_ids=torch.arange(past_length + start, past_length + end, device=self.device).expand(count, -1),
                cache=cache,
                use_cache=True,
            ).logits.float()
            real = mask[:, start:end].bool()  # padding may hold anything, NaN included
            if previous is not None:
                totals += torch.where(real[:, 0], previous.gather(1, piece[:, :1]).squeeze(1), 0.0)
            following = _target_logprobs(logits[:, :-1], piece[:, 1:])
            totals += torch.where(real[:, 1:], following, 0.0).sum(dim=1)
            previous = logits[:, -1].log_softmax(dim=-1)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        return totals.cpu(), previous[:1], layers

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceededError("scoring did not finish before the request's deadline")


def _right_padded(encoded: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)`` at ``targets`` only: no second vocabulary-sized tensor."""
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
