"""Fixtures of the generation tests: the bundled model on the torch runtime."""

from __future__ import annotations

import pytest
import torch

from batchserve.runtimes.torch.lm import TorchCausalLM


@pytest.fixture(scope="module")
def lm():
    """The bundled SmolLM2 on the torch runtime, one torch thread while the module runs
    (on a CPU shared with other tests, spinning OpenMP threads slow it down many times)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchCausalLM.load()
    torch.set_num_threads(threads)


@pytest.fixture
def own_lm(lm):
    """A runtime of its own over the same weights, for a test that starts its own engine: a
    runtime's sequences belong to one engine, and the module's engine may still be dropping the
    rows of an earlier test's cancelled requests."""
    return TorchCausalLM(lm.model, lm.tokenizer, lm.model_name, lm.load_info)
