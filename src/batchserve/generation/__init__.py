"""Text generation: a causal LM behind a continuous-batching engine.

The data path: ``loading`` (GGUF → safetensors cache → model) feeds ``engine`` (the running
batch, in its own thread), which keeps its KV cache in ``kv``, draws tokens with
``sampling`` and turns them into streamable text with ``detokenize``; ``request`` is what
the asyncio side holds.
"""

from batchserve.generation.engine import EngineLimits, GenerationEngine
from batchserve.generation.loading import LoadedModel, load_causal_lm
from batchserve.generation.request import Choice, ChoiceDelta, Completion, GenerationRequest
from batchserve.generation.sampling import SamplingParams

__all__ = [
    "Choice",
    "ChoiceDelta",
    "Completion",
    "EngineLimits",
    "GenerationEngine",
    "GenerationRequest",
    "LoadedModel",
    "SamplingParams",
    "load_causal_lm",
]
