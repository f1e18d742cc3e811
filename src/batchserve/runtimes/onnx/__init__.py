"""The ONNX Runtime encoder (:mod:`.encoder`): a sentence-transformers model exported once
into the cache, run by onnxruntime (the CPU default of the embeddings app)."""
