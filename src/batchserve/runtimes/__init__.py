"""Model runtimes: what executes a model's forward passes, behind two small interfaces.

* :class:`~batchserve.runtimes.base.EncoderRuntime` — texts → vectors (the embeddings app);
* :class:`~batchserve.runtimes.base.CausalLM` — prefill / fork / decode over sequences
  whose KV cache the runtime owns, and scoring (the generation engine, infill).

Apps and the engine hold an interface, never a framework: which runtime runs is a name in
:data:`ENCODERS` / :data:`LANGUAGE_MODELS`, looked up by :func:`encoder_class` /
:func:`language_model_class`.  Adding a runtime is one module plus
one line there.
"""

from __future__ import annotations

import importlib

from batchserve.extras import needs_extra
from batchserve.runtimes.base import CausalLM, EncoderRuntime

#: encoder runtime name → class (imported when first asked for)
ENCODERS: dict[str, str] = {
    "torch": "batchserve.runtimes.torch.encoder:TorchEncoder",
    "onnx": "batchserve.runtimes.onnx.encoder:OnnxEncoder",
}

#: causal-LM runtime name → class (imported when first asked for); built with ``cls.load(path, cache_dir, device, ...)``
LANGUAGE_MODELS: dict[str, str] = {
    "torch": "batchserve.runtimes.torch.lm:TorchCausalLM",
    "llama.cpp": "batchserve.runtimes.llama.lm:LlamaCausalLM",
}


def encoder_class(name: str) -> type[EncoderRuntime]:
    return _resolve(ENCODERS, name, "encoder", "embeddings")


def language_model_class(name: str) -> type[CausalLM]:
    return _resolve(LANGUAGE_MODELS, name, "causal-LM", "generation")


def _resolve(registry: dict[str, str], name: str, kind: str, extra: str):
    """The class ``registry`` names ``name``, imported now; its packages come with ``extra``."""
    try:
        reference = registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} runtime {name!r}; choose one of {', '.join(registry)}") from None
    module, _, attribute = reference.partition(":")
    with needs_extra(extra, f"the {name} {kind} runtime"):
        return getattr(importlib.import_module(module), attribute)


__all__ = ["ENCODERS", "LANGUAGE_MODELS", "CausalLM", "EncoderRuntime", "encoder_class", "language_model_class"]
