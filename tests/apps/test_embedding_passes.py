"""The bundled embedding model runs batches in token-budgeted, length-grouped passes (the
batcher's general policy, declared by the model: batch_length and max_batch_tokens); the
vectors are those of one padded pass, in the order sent (benchmarks/padding.py measures why:
padding costs CPU)."""

from __future__ import annotations

import threading

import numpy as np

from batchserve import Batcher
from batchserve.apps.embeddings import MAX_BATCH_TOKENS, EmbeddingModel
from batchserve.bench.bodies import sentences


class RecordingModel(EmbeddingModel):
    """The bundled model, recording the texts of each pass it is given."""

    def __init__(self):
        super().__init__(device="cpu")
        self.passes: list[list[str]] = []
        self.lock = threading.Lock()

    def predict(self, texts):
        with self.lock:
            self.passes.append(list(texts))
        return super().predict(texts)


def test_the_model_declares_a_token_budget_measured_by_its_tokenizer():
    assert EmbeddingModel.max_batch_tokens == MAX_BATCH_TOKENS == 256
    assert EmbeddingModel.batch_length("a") == 3  # [CLS] a [SEP]
    assert EmbeddingModel.batch_length("a " * 300) == 256  # truncated as the model does


async def test_batches_run_in_passes_within_the_budget_with_the_same_vectors():
    model = RecordingModel()
    model.load()
    texts = sentences(48)  # short and long mixed
    batcher = Batcher(
        model, max_batch_size=64, length=EmbeddingModel.batch_length, max_batch_tokens=EmbeddingModel.max_batch_tokens
    )
    try:
        outputs = await batcher.submit(texts)
    finally:
        await batcher.close()
    assert len(model.passes) > 1
    assert sorted(text for group in model.passes for text in group) == sorted(texts)
    for group in model.passes:
        lengths = [EmbeddingModel.batch_length(text) for text in group]
        assert len(group) == 1 or len(group) * max(lengths) <= MAX_BATCH_TOKENS
    one_pass = model.encoder.encode(texts)
    np.testing.assert_allclose(np.stack([vector for vector, _ in outputs]), one_pass, atol=1e-5)
    assert [count for _, count in outputs] == [EmbeddingModel.batch_length(text) for text in texts]
    stats = batcher.stats
    assert stats.passes == len(model.passes) and stats.real_tokens == sum(count for _, count in outputs)
    assert stats.padded_tokens < len(texts) * max(count for _, count in outputs)  # less padding than one pass
