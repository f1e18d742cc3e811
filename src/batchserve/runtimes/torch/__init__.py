"""The torch runtimes: :mod:`.encoder` (sentence-transformers), :mod:`.lm`
(:class:`~.lm.TorchCausalLM`, over :mod:`.kv`'s left-padded rows and :mod:`.scoring`) and
:mod:`.loading` (a causal LM from a Hugging Face directory, or a GGUF dequantized once into
the cache).  Absolute imports only: ``import torch`` in these modules is PyTorch itself."""
