"""Per-row sampling: each row its own temperature, top-k, top-p and seed (no model needed)."""

from __future__ import annotations

import torch

from batchserve.generation.sampling import SamplingParams, row_generator, sample

VOCAB = 50


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def draws(row_logits: torch.Tensor, params: SamplingParams, choice: int = 0, count: int = 200) -> list[int]:
    generator = row_generator(params.seed, choice)
    return [sample(row_logits[None], [params], [generator])[0] for _ in range(count)]


def test_greedy_is_argmax_per_row():
    scores = logits(4)
    greedy = SamplingParams(temperature=0)
    assert sample(scores, [greedy] * 4, [row_generator(None, row) for row in range(4)]) == scores.argmax(-1).tolist()
    tiny = SamplingParams(temperature=1e-7)  # below GREEDY_BELOW: argmax, no overflow
    assert sample(scores, [tiny] * 4, [row_generator(1, row) for row in range(4)]) == scores.argmax(-1).tolist()


def test_seeds_repeat_and_choices_differ():
    scores = logits(1)[0]
    params = SamplingParams(temperature=1.5, seed=1234)
    assert draws(scores, params, choice=0) == draws(scores, params, choice=0)
    assert draws(scores, params, choice=0) != draws(scores, params, choice=1)
    assert draws(scores, SamplingParams(temperature=1.5, seed=1235)) != draws(scores, params)
    big = SamplingParams(temperature=1.5, seed=-(2**70))  # any int, negative and past 64 bits too
    assert draws(scores, big) == draws(scores, big)
    unseeded = SamplingParams(temperature=1.5)
    assert draws(scores, unseeded) != draws(scores, unseeded)  # fresh entropy each time


def test_top_k_only_draws_the_k_best():
    scores = logits(1, seed=3)[0]
    best = set(scores.topk(5).indices.tolist())
    drawn = set(draws(scores, SamplingParams(temperature=5.0, top_k=5, seed=9), count=400))
    assert drawn <= best
    assert len(drawn) >= 3  # a high temperature spreads over the five


def test_top_p_keeps_the_smallest_set_reaching_p():
    scores = logits(1, seed=4)[0]
    probs = (scores / 2.0).softmax(-1)
    order = probs.argsort(descending=True)
    cumulative = probs[order].cumsum(-1)
    kept = set(order[: int((cumulative < 0.6).sum()) + 1].tolist())  # the nucleus: mass before each < 0.6
    drawn = set(draws(scores, SamplingParams(temperature=2.0, top_p=0.6, seed=5), count=400))
    assert drawn <= kept
    assert len(drawn) >= min(2, len(kept))
    assert set(draws(scores, SamplingParams(temperature=2.0, top_p=1e-9, seed=5), count=50)) == {int(order[0])}


def test_each_row_keeps_its_own_parameters_in_one_batch():
    scores = logits(3, seed=6)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=3.0, top_k=1, seed=1),
        SamplingParams(temperature=3.0, top_k=3, seed=2),
    ]
    top3 = set(scores[2].topk(3).indices.tolist())
    for _ in range(50):
        tokens = sample(scores, params, [row_generator(p.seed, 0) for p in params])
        assert tokens[0] == int(scores[0].argmax())
        assert tokens[1] == int(scores[1].argmax())  # top-k 1 is argmax whatever the temperature
        assert tokens[2] in top3
    drawn_row2 = {sample(scores, params, [row_generator(None, 0)] * 3)[2] for _ in range(200)}
    assert len(drawn_row2) >= 2


def test_the_whole_vocabulary_is_drawn_by_its_inverse_cdf_block_by_block():
    """Without top-k/top-p the draw takes block sums, then one block's running sum: the token
    a full running sum gives, for any uniform draw, across blocks and a short last block."""
    import numpy as np

    from batchserve.generation.sampling import BLOCK, _inverse_cdf

    rng = np.random.default_rng(0)
    weights = np.exp(rng.normal(size=2 * BLOCK + 37) * 3).astype(np.float32)
    weights[BLOCK : BLOCK + 5] = 0.0  # zero weights are never drawn
    full = np.cumsum(weights, dtype=np.float64)
    for uniform in [0.0, 1e-12, *rng.random(2000), 1 - 1e-12]:
        expected = min(int(np.searchsorted(full, uniform * full[-1], side="right")), len(weights) - 1)
        assert _inverse_cdf(weights, float(uniform)) == expected
    vocab = logits(1, seed=6)[0].repeat(60)  # 3000 tokens: several blocks
    counts = np.bincount(draws(vocab, SamplingParams(temperature=1.0, seed=3), count=4000), minlength=len(vocab))
    probs = vocab.softmax(-1).numpy()
    best = int(probs.argmax())  # 60 copies of each of the 50 tokens: each copy drawn as often as its probability says
    assert abs(counts[best] / 4000 - probs[best]) < 0.02


def test_token_logprobs_are_the_models_distribution_whatever_the_sampling():
    from batchserve.generation.sampling import token_logprobs

    scores = logits(3)
    expected = scores.log_softmax(-1)
    tokens = [int(scores[0].argmax()), 7, 11]
    found = token_logprobs(scores, [0, 2], [tokens[0], tokens[2]], [3, 0])
    assert [entry.token for entry in found] == [tokens[0], tokens[2]]
    assert abs(found[0].logprob - float(expected[0].max())) < 1e-6 and abs(found[1].logprob - float(expected[2, 11])) < 1e-6
    top_tokens = [token for token, _ in found[0].top]
    assert top_tokens == expected[0].topk(3).indices.tolist() and found[0].top[0][1] == found[0].logprob
    assert found[1].top == ()
    assert token_logprobs(scores, [], [], []) == []


def test_penalties_and_biases_change_only_the_tokens_they_name():
    from batchserve.generation.sampling import adjust_logits

    row = torch.zeros(VOCAB)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((7, -100.0), (9, 3.0)))
    assert params.adjusts and not SamplingParams().adjusts
    adjust_logits(row, params, [4, 4, 4, 5])
    expected = torch.zeros(VOCAB)
    expected[4], expected[5], expected[7], expected[9] = -(0.5 + 3 * 0.25), -(0.5 + 0.25), -100.0, 3.0
    assert torch.equal(row, expected)
