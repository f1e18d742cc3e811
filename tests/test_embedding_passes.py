"""The bundled embedding model runs CPU batches in length-grouped passes; the vectors are
those of one padded pass (benchmarks/padding.py measures why: padding costs CPU)."""

from __future__ import annotations

import numpy as np

from batchserve.apps.embeddings import CPU_PASS, EmbeddingModel
from batchserve.bench.bodies import sentences


def test_cpu_batches_run_in_passes_with_the_same_vectors():
    model = EmbeddingModel(device="cpu")
    model.load()
    texts = sentences(48)  # short and long mixed
    assert model.texts_per_pass(len(texts)) == CPU_PASS < len(texts)
    assert model.texts_per_pass(3) == 3
    outputs = model.predict(texts)
    one_pass = model.encoder.model.encode(texts, batch_size=len(texts), convert_to_numpy=True)
    np.testing.assert_allclose(np.stack([vector for vector, _ in outputs]), one_pass, atol=1e-5)
    assert [count for _, count in outputs] == [len(ids) for ids in model.encoder.model.tokenizer(texts)["input_ids"]]
