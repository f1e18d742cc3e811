"""Scoring texts through the causal-LM runtime (infill's candidates) on the bundled SmolLM2."""

from __future__ import annotations

import time

import pytest
import torch

from batchserve.errors import DeadlineExceededError
from batchserve.generation import scoring
from batchserve.runtimes.torch import scoring as torch_scoring


def whole_text_logprob(lm, text: str) -> float:
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        logprobs = lm.model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return float(logprobs.gather(1, ids[0, 1:, None]).sum())


@pytest.mark.parametrize("budget", ["default", "tiny"])
def test_scoring_shares_the_prefix_and_matches_each_text_scored_whole(lm, monkeypatch, budget):
    prefix = "Up above the world so high, like a diamond in the sky. " * 3 + "Twinkle twinkle"
    texts = [prefix + fill for fill in (" little star.", " big star, how I wonder.", " star.", "")]
    texts += ["A text with nothing in common.", "twinkle"]  # no shared prefix with the first group
    if budget == "tiny":  # one row per group, three columns per pass: many passes, same scores
        vocabulary = lm.model.get_output_embeddings().weight.shape[0]
        monkeypatch.setattr(torch_scoring, "LOGITS_BYTES", 3 * vocabulary * torch_scoring.FLOAT_BYTES)
        monkeypatch.setattr(torch_scoring, "CACHE_COPY_BYTES", 1)
    for group in (texts[:4], texts):
        scores = scoring.text_logprobs(lm, group)
        assert scores == pytest.approx([whole_text_logprob(lm, text) for text in group], abs=2e-3)
    with pytest.raises(DeadlineExceededError):  # a passed deadline stops scoring between passes
        scoring.text_logprobs(lm, texts, deadline=time.monotonic())


def test_scoring_several_texts_candidates_in_one_call_matches_each_scored_whole(lm):
    """Infill's merged calls: the candidates of three texts, interleaved, one text repeated."""
    texts = []
    for fill in (" little", " big", " bright"):
        texts += [f"Twinkle twinkle{fill} star, how I wonder what you are.", f"Happy birthday to{fill} you.",
                  f"The answer to life, the{fill} universe, and everything."]
    texts.append(texts[0])
    scores = scoring.text_logprobs(lm, texts)
    assert scores == pytest.approx([whole_text_logprob(lm, text) for text in texts], abs=2e-3)


def test_scoring_leaves_the_running_sequences_alone(lm):
    """Scoring is other work between two steps: the live sequences and their next logits stay."""
    lm.prefill([0], [lm.encode("The capital of France is")])
    before = lm.live
    scoring.text_logprobs(lm, ["Twinkle twinkle little star.", "Twinkle twinkle big star."])
    assert lm.live == before
    with torch.inference_mode():
        after = lm.decode([0], [lm.encode(" Paris", add_special_tokens=False)[0]])
    lm.clear()
    alone = lm.next_logits(lm.encode("The capital of France is") + lm.encode(" Paris", add_special_tokens=False))
    assert torch.allclose(after[0], alone, atol=1e-4)


def test_next_token_texts_are_the_most_probable_after_the_text(lm):
    texts = scoring.next_token_texts(lm, "The capital of France is", 5)
    assert len(texts) == 5 and len(set(texts)) == 5
    assert texts[0] == " Paris"
    logits = lm.next_logits(lm.encode("The capital of France is"))
    assert [lm.tokenizer.decode([t]) for t in logits.topk(5).indices.tolist()] == texts
