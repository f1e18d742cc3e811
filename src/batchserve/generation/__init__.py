"""Text generation: a causal LM behind a continuous-batching engine.

The data path: ``engine`` (the running batch, in its own thread) schedules and a causal-LM
runtime (:mod:`batchserve.runtimes`: the model, its KV cache, its passes) executes; the
engine draws tokens with ``sampling`` and turns each row's into streamable text with
``text`` (stop strings, finish reasons; over ``detokenize``); ``request`` is what the
asyncio side holds; ``scoring`` scores texts through the runtime (infill).
"""

from batchserve.generation.engine import EngineLimits, GenerationEngine
from batchserve.generation.request import Choice, ChoiceDelta, Completion, GenerationRequest
from batchserve.generation.sampling import MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob
from batchserve.runtimes.torch.loading import LoadedModel, load_causal_lm  # the torch runtime's loader, re-exported

__all__ = [
    "Choice",
    "ChoiceDelta",
    "Completion",
    "EngineLimits",
    "GenerationEngine",
    "GenerationRequest",
    "LoadedModel",
    "MAX_TOP_LOGPROBS",
    "SamplingParams",
    "TokenLogprob",
    "load_causal_lm",
]
