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
    tokens = logits.argmax(dim=-1)
    drawn = [row for row, p in enumerate(params) if not p.greedy]
    if drawn:
        index = torch.tensor(drawn)
        chosen = _draw(logits[index], [params[row] for row in drawn], [generators[row] for row in drawn])
        tokens[index] = chosen
    return tokens.tolist()


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([_draw_row(row, p, g) for row, p, g in zip(logits, params, generators)])


def _draw_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Temperature, then top-k (``topk``, no full sort), then top-p (sorts only the survivors)."""
    vocab = logits.shape[-1]
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
    return pick[0] if tokens is None else tokens[pick[0]]
