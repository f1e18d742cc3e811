"""Scoring texts with the engine's causal LM (infill's candidates), through its runtime.

These run in the engine thread between two steps (``engine.call(text_logprobs, ...)``);
the runtime does the passes (:meth:`~batchserve.runtimes.base.CausalLM.score`: shared
prefixes run once, memory bounded, the deadline checked between passes).
"""

from __future__ import annotations

from batchserve.runtimes.base import CausalLM


def text_logprobs(lm: CausalLM, texts: list[str], deadline: float | None = None) -> list[float]:
    """Sum of ``log p(token | tokens before it)`` over each text's tokens (its first token is given)."""
    return lm.score([lm.encode(text) for text in texts], deadline)


def next_token_texts(lm: CausalLM, text: str, k: int) -> list[str]:
    """The ``k`` most probable next tokens after ``text``, decoded."""
    logits = lm.next_logits(lm.encode(text))
    return [lm.tokenizer.decode([token]) for token in logits.topk(k).indices.tolist()]
