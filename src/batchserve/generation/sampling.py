"""Per-row sampling: every row of the batch has its own temperature, top-k, top-p and seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

GREEDY_BELOW = 1e-5  # temperatures this low are argmax (dividing by them overflows)


@dataclass(frozen=True)
class SamplingParams:
    """How one request's choices are drawn.  ``temperature == 0`` is greedy decoding."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks: a fixed length)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def row_generator(seed: int | None, choice: int) -> torch.Generator:
    """The random stream of one choice: fixed by ``(seed, choice)``, fresh entropy without a seed."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        entropy = [seed & (2**64 - 1), seed >> 64 & (2**64 - 1), choice]  # any int, negative included
        generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))
    return generator


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One next token per row of ``logits`` ``[rows, vocab]``, each row with its own parameters."""
    logits = logits.float().cpu()  # [rows, vocab]: small next to a forward pass, and the generators are CPU ones
    greedy = [row for row, p in enumerate(params) if p.greedy]
    tokens = [0] * len(params)
    if greedy:
        for row, token in zip(greedy, logits[torch.tensor(greedy)].argmax(dim=-1).tolist()):
            tokens[row] = token
    for row, (p, generator) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[row] = _draw_row(logits[row], p, generator)
    return tokens


def _draw_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Temperature, then top-k (``topk``, no full sort), then top-p (sorts only the survivors);
    with neither, the whole vocabulary by :func:`_inverse_cdf` (no full-length running sum)."""
    vocab = logits.shape[-1]
    if not 0 < params.top_k < vocab and params.top_p >= 1.0:
        row = logits.numpy()
        weights = np.exp((row - row.max()) / np.float32(params.temperature))
        return _inverse_cdf(weights, float(torch.rand((), generator=generator, dtype=torch.float64)))
    scores, tokens = logits / params.temperature, None
    if 0 < params.top_k < vocab:
        scores, tokens = scores.topk(params.top_k)  # sorted, descending
    if params.top_p < 1.0:
        if tokens is None:
            scores, tokens = scores.sort(descending=True)
        probs = scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill((mass_before >= params.top_p) & (torch.arange(len(probs)) > 0), 0.0)
    else:
        probs = scores.softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1)
    threshold = torch.rand((), generator=generator, dtype=torch.float64).float() * cumulative[-1]
    pick = torch.searchsorted(cumulative, threshold.unsqueeze(0), right=True).clamp(max=len(probs) - 1)
    return int(pick[0] if tokens is None else tokens[pick[0]])


#: weights summed per block by :func:`_inverse_cdf`
BLOCK = 1024


def _inverse_cdf(weights: np.ndarray, uniform: float) -> int:
    """The first index where the running sum of ``weights`` (>= 0, not all 0) passes
    ``uniform`` x their total: the sums of blocks of :data:`BLOCK` weights, then the running
    sum inside one block only (a vocabulary's worth of running sum costs a millisecond's
    fraction a token)."""
    starts = np.arange(0, len(weights), BLOCK)
    cumulative = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    target = uniform * cumulative[-1]
    block = min(int(np.searchsorted(cumulative, target, side="right")), len(starts) - 1)
    before = cumulative[block - 1] if block else 0.0
    inner = np.cumsum(weights[starts[block] : starts[block] + BLOCK], dtype=np.float64) + before
    return int(starts[block] + min(int(np.searchsorted(inner, target, side="right")), len(inner) - 1))
