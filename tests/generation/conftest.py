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
