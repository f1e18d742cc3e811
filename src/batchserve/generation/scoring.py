"""Scoring whole texts with the causal LM: the log-probability of each text's tokens."""

from __future__ import annotations

import torch


def text_logprobs(model, tokenizer, texts: list[str]) -> list[float]:
    """Sum of ``log p(token | tokens before it)`` over each text (its first token is given).

    Texts are right-padded into one batch; padding is masked out of attention and of the sum.
    """
    encoded = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(texts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
    logprobs = logits[:, :-1].log_softmax(dim=-1).gather(2, input_ids[:, 1:].unsqueeze(2)).squeeze(2)
    return (logprobs * mask[:, 1:]).sum(dim=1).tolist()


def next_token_texts(model, tokenizer, text: str, k: int) -> list[str]:
    """The ``k`` most probable next tokens after ``text``, decoded."""
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"]])
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), logits_to_keep=1).logits[0, -1]
    return [tokenizer.decode([token]) for token in logits.topk(k).indices.tolist()]
