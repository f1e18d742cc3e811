"""The torch causal-LM runtime on the bundled SmolLM2: sequences over one left-padded row cache.

Whatever joins, forks or leaves the cache, each sequence's logits are those of running it
alone (a plain full pass over its tokens).
"""

from __future__ import annotations

import pytest
import torch

from batchserve.runtimes import LANGUAGE_MODELS, CausalLM, language_model_class
from batchserve.runtimes.torch.kv import RowCache
from batchserve.runtimes.torch.lm import TorchCausalLM
from tests.runtimes.causal_lm_contract import PROMPTS, prefill_fork_decode_each_alone, rows_join_and_leave


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.inference_mode():
        yield TorchCausalLM.load()
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh(lm):
    lm.clear()
    with torch.inference_mode():
        yield
    lm.clear()


def alone(lm: TorchCausalLM, ids: list[int]) -> torch.Tensor:
    """The logits after ``ids``, one sequence, no cache."""
    return lm.next_logits(ids)


def check(lm, logits: torch.Tensor, sequences: list[list[int]]) -> None:
    assert logits.shape[0] == len(sequences)
    for row, ids in zip(logits, sequences):
        expected = alone(lm, ids)
        assert int(row.argmax()) == int(expected.argmax())
        assert torch.allclose(row.float(), expected.float(), atol=2e-3), float((row - expected).abs().max())


def test_registry_names_the_torch_runtime():
    assert language_model_class("torch") is TorchCausalLM and issubclass(TorchCausalLM, CausalLM)
    assert set(LANGUAGE_MODELS) >= {"torch"}
    with pytest.raises(ValueError, match="choose one of torch"):
        language_model_class("nope")


def test_model_facts(lm):
    assert lm.model_name == "SmolLM2-135M-Instruct" and lm.name == "torch"
    assert lm.max_positions == 8192
    assert lm.tokenizer.eos_token_id in lm.stop_tokens
    assert lm.detokenize(lm.encode("Hello world", add_special_tokens=False)) == "Hello world"
    assert lm.load_info["path"] and lm.load_info["load_seconds"] >= 0


def test_prefill_fork_decode_equal_each_sequence_alone(lm):
    prefill_fork_decode_each_alone(lm, [lm.encode(p) for p in PROMPTS], check)  # three lengths: left padding


def test_rows_join_and_leave_between_steps_and_keep_their_logits(lm):
    sequences = rows_join_and_leave(lm, check)  # the short row joins left-padded under the long one
    assert lm._cache.columns == len(sequences[1])  # the long row's all-padding columns were dropped


def test_release_frees_rows_and_decode_takes_every_live_sequence(lm):
    prompts = [lm.encode(p) for p in PROMPTS]
    lm.prefill([0, 1, 2], prompts)
    lm.release([1])
    assert sorted(lm.live) == [0, 2]
    with pytest.raises(ValueError):
        lm.decode([0], [5])  # sequence 2 is live too
    with pytest.raises(ValueError):
        lm.prefill([2], [prompts[0]])  # live already
    with pytest.raises(KeyError):
        lm.fork(1, [7])  # released
    logits = lm.decode([2, 0], [5, 6])
    assert logits.shape[0] == 2 and lm._cache.rows == 2
    check(lm, logits, [prompts[2] + [5], prompts[0] + [6]])
    lm.release([0, 2])
    assert lm.live == [] and lm._cache is None  # nothing held once every sequence left
    lm.prefill([1], [prompts[1]])  # an id can be used again once released
    assert lm.live == [1]


def test_a_failed_prefill_leaves_the_running_sequences_as_they_were(lm):
    prompt = lm.encode(PROMPTS[0])
    lm.prefill([0], [prompt])
    with pytest.raises((IndexError, RuntimeError)):
        lm.prefill([1], [[lm.model.config.vocab_size + 10]])  # no such token
    assert lm.live == [0]
    check(lm, lm.decode([0], [9]), [prompt + [9]])


def test_row_cache_merge_and_select_keep_each_rows_states():
    """Left-padding merge, repeated and dropped rows, and trimming of padding columns."""
    from transformers import DynamicCache

    def states(rows, columns, fill):
        return torch.arange(rows * columns, dtype=torch.float32).reshape(rows, 1, columns, 1) + fill

    first = RowCache(DynamicCache(ddp_cache_data=[(states(1, 4, 0), states(1, 4, 100))]), torch.tensor([[1, 1, 1, 1]]))
    second = RowCache(DynamicCache(ddp_cache_data=[(states(2, 2, 1000), states(2, 2, 2000))]), torch.tensor([[0, 1], [1, 1]]))
    assert float(second.layers()[0][0][0, 0, 0, 0]) == 0.0  # padding cleared
    first.merge(second)
    assert first.rows == 3 and first.columns == 4
    assert first.mask.tolist() == [[1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]
    keys, _ = first.layers()[0]
    assert keys[2, 0, 2:, 0].tolist() == [1002.0, 1003.0] and keys[1, 0, :3, 0].tolist() == [0.0, 0.0, 0.0]
    first.select([2, 2, 1])  # the first row leaves, the third repeats: two padding columns go
    assert first.columns == 2 and first.mask.tolist() == [[1, 1], [1, 1], [0, 1]]
    keys, values = first.layers()[0]
    assert keys[:, 0, :, 0].tolist() == [[1002.0, 1003.0], [1002.0, 1003.0], [0.0, 1001.0]]
    assert values[0, 0, :, 0].tolist() == [2002.0, 2003.0]
    assert first.extend_mask().tolist() == [[1, 1, 1], [1, 1, 1], [0, 1, 1]]
