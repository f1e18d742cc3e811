"""The llama.cpp runtime: :mod:`.lm` (:class:`~.lm.LlamaCausalLM`, a :class:`CausalLM` over
one unified KV cache), :mod:`.native` (the ctypes calls), :mod:`.prefix` (the prefix
cache's decisions) and :mod:`.loading` (the GGUF's tokenizer, cached).  Its files are its
own: nothing here imports the torch runtime."""
