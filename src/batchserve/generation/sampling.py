"""Per-row sampling: every row of the batch has its own temperature, top-k, top-p and seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request's choices are drawn.  ``temperature == 0`` is greedy decoding."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_generator(seed: int | None, choice: int) -> torch.Generator:
    """The random stream of one choice: fixed by ``(seed, choice)``, fresh entropy without a seed."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(np.random.SeedSequence([seed, choice]).generate_state(1, np.uint64)[0]))
    return generator


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One next token per row of ``logits`` ``[rows, vocab]``, each row with its own parameters."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    drawn = [row for row, p in enumerate(params) if not p.greedy]
    if drawn:
        index = torch.tensor(drawn)
        chosen = _draw(logits[index], [params[row] for row in drawn], [generators[row] for row in drawn])
        tokens[index] = chosen
    return tokens.tolist()


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    vocab = logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params]).unsqueeze(1)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params]).unsqueeze(1)
    top_p = torch.tensor([p.top_p for p in params]).unsqueeze(1)

    sorted_logits, sorted_tokens = (logits / temperature).sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    ranks = torch.arange(vocab).unsqueeze(0)
    mass_before = probs.cumsum(dim=-1) - probs
    removed = (ranks >= top_k) | ((mass_before >= top_p) & (ranks > 0))
    probs = probs.masked_fill(removed, 0.0)
    cumulative = probs.cumsum(dim=-1)
    uniform = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).float()
    threshold = (uniform * cumulative[:, -1]).unsqueeze(1)
    picks = torch.searchsorted(cumulative, threshold, right=True).clamp(max=vocab - 1)
    return sorted_tokens.gather(1, picks).squeeze(1)
