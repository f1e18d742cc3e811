"""Per-row sampling: every row of the batch has its own temperature, top-k, top-p and seed;
and the log-probabilities of the tokens drawn, for the rows that ask (:func:`token_logprobs`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

GREEDY_BELOW = 1e-5  # temperatures this low are argmax (dividing by them overflows)
MAX_TOP_LOGPROBS = 20  # the most alternatives a token's log-probability comes with (OpenAI's limit)


@dataclass(frozen=True)
class TokenLogprob:
    """A drawn token's log-probability under the model's distribution at its step, and the
    ``top`` likeliest tokens there, ``(token, logprob)`` from the likeliest."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
    #: None: no log-probabilities; k (0 to :data:`MAX_TOP_LOGPROBS`): each token's, with the k likeliest
    logprobs: int | None = None

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


def token_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """For each of ``rows`` of ``logits`` ``[rows, vocab]``: ``tokens[i]``'s log-probability and the
    ``tops[i]`` likeliest tokens', under the model's distribution: the softmax of the logits as
    the model gives them (after a constrained row's mask), before temperature, top-k and top-p
    (so they do not depend on how the row samples, and greedy decoding's token is the likeliest)."""
    if not rows:
        return []
    logprobs = logits[torch.tensor(rows)].float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()
    most = max(tops)
    if most:
        values, indices = logprobs.topk(most, dim=-1)
        values, indices = values.tolist(), indices.tolist()
    results = []
    for i, (token, k) in enumerate(zip(tokens, tops)):
        top = tuple(zip(indices[i][:k], values[i][:k])) if k else ()
        results.append(TokenLogprob(token, chosen[i], top))
    return results


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
