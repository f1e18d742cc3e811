"""Scoring whole texts with the causal LM: the log-probability of each text's tokens."""

from __future__ import annotations

import time

import torch

from batchserve.errors import DeadlineExceededError

#: most logits (rows x tokens x vocabulary) one scoring pass may hold: 64 MiB of float32.
#: Scoring 48 candidate fills of a long text at once would otherwise take gigabytes.
LOGITS_BUDGET = 2**24


def text_logprobs(model, tokenizer, texts: list[str], deadline: float | None = None) -> list[float]:
    """Sum of ``log p(token | tokens before it)`` over each text (its first token is given).

    Texts go through the model in groups small enough that their logits stay within
    :data:`LOGITS_BUDGET`; each group is right-padded, and padding is masked out of
    attention and of the sum.  Past ``deadline`` (``time.monotonic()``), no further group
    is run: :class:`DeadlineExceededError`, and the model is free for other work.
    """
    encoded = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocabulary = model.get_output_embeddings().weight.shape[0]
    scores: list[float] = []
    for group in _groups(encoded, vocabulary):
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceededError("scoring did not finish before the request's deadline")
        scores += _score_group(model, group, pad)
    return scores


def _groups(encoded: list[list[int]], vocabulary: int) -> list[list[list[int]]]:
    """Consecutive texts, as many per group as fit the budget (at least one)."""
    groups: list[list[list[int]]] = []
    group: list[list[int]] = []
    for ids in encoded:
        width = max([len(ids), *map(len, group)])
        if group and (len(group) + 1) * width * vocabulary > LOGITS_BUDGET:
            groups.append(group)
            group = []
        group.append(ids)
    return groups + [group] if group else groups


def _score_group(model, encoded: list[list[int]], pad: int) -> list[float]:
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        targets = input_ids[:, 1:].to(device)
        # log_softmax at the targets only: no second vocabulary-sized tensor
        logprobs = logits.gather(2, targets.unsqueeze(2)).squeeze(2) - logits.logsumexp(dim=-1)
    return (logprobs.cpu() * mask[:, 1:]).sum(dim=1).tolist()


def next_token_texts(model, tokenizer, text: str, k: int) -> list[str]:
    """The ``k`` most probable next tokens after ``text``, decoded."""
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"]])
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), logits_to_keep=1).logits[0, -1]
    return [tokenizer.decode([token]) for token in logits.topk(k).indices.tolist()]
