"""Model runtimes: what executes a model's forward passes, behind two small interfaces.

* :class:`~batchserve.runtimes.base.EncoderRuntime` — texts → vectors (the embeddings app);
* the causal-LM runtime under the generation engine (see :mod:`batchserve.generation`).

Apps and the engine hold an interface, never a framework: which runtime runs is a name in
:data:`ENCODERS`, looked up by :func:`encoder_class`.  Adding a runtime is one module plus
one line there.
"""

from __future__ import annotations

import importlib

from batchserve.runtimes.base import EncoderRuntime

#: encoder runtime name → class (imported when first asked for)
ENCODERS: dict[str, str] = {
    "torch": "batchserve.runtimes.torch_encoder:TorchEncoder",
    "onnx": "batchserve.runtimes.onnx_encoder:OnnxEncoder",
}


def encoder_class(name: str) -> type[EncoderRuntime]:
    try:
        reference = ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder runtime {name!r}; choose one of {', '.join(ENCODERS)}") from None
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


__all__ = ["ENCODERS", "EncoderRuntime", "encoder_class"]
