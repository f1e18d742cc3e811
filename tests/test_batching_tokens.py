"""Token budgets: a dispatched batch runs as length-grouped passes within max_batch_tokens."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from batchserve import Batcher, InputError, ModelError
from batchserve.batching import length_passes


class PassRecorder:
    """Echoes words after a small fixed cost per pass, records each pass; 'poison' raises."""

    def __init__(self):
        self.passes: list[list[str]] = []
        self.lock = threading.Lock()

    def predict(self, batch: list) -> list:
        with self.lock:
            self.passes.append(list(batch))
        if "poison" in batch:
            raise ValueError("poison cannot be echoed")
        return [text.upper() for text in batch]


def words(text: str) -> int:
    return len(text.split())


def sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice("ab cd ef gh ij".split()) for _ in range(length))


@pytest.mark.parametrize("seed", range(5))
def test_length_passes_hold_both_bounds_and_cover_every_item_once(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(30, 90)]) for _ in range(rng.randint(1, 200))]
    max_rows, max_tokens = rng.choice([(64, 512), (16, 1024), (8, 100), (200, 64)])
    passes = length_passes(lengths, max_rows, max_tokens)
    assert sorted(p for group in passes for p in group) == list(range(len(lengths)))
    for group in passes:
        assert len(group) <= max_rows
        longest = max(lengths[p] for p in group)
        assert len(group) * longest <= max_tokens or len(group) == 1  # an item over the budget goes alone


async def test_passes_respect_the_budget_and_results_come_back_in_order(make_batcher):
    rng = random.Random(7)
    model = PassRecorder()
    batcher = make_batcher(model, max_batch_size=64, max_latency=0.05, length=words, max_batch_tokens=120)
    requests = [[sentence(rng, rng.choice([2, 3, 25, 30])) for _ in range(rng.randint(1, 5))] for _ in range(40)]
    results = await asyncio.gather(*(batcher.submit(texts) for texts in requests))
    assert results == [[text.upper() for text in texts] for texts in requests]
    for piece in model.passes:
        assert len(piece) <= 64
        assert len(piece) * max(map(words, piece)) <= 120
    assert batcher.stats.passes == len(model.passes)
    assert batcher.stats.real_tokens == sum(words(text) for texts in requests for text in texts)


async def test_padding_waste_on_a_mixed_batch_falls(make_batcher):
    """The same mixed batch of short and long texts, as one padded pass and as budgeted passes."""
    rng = random.Random(3)
    texts = [sentence(rng, 3) if i % 2 else sentence(rng, 40) for i in range(32)]
    real = sum(map(words, texts))
    one_pass_padded = len(texts) * max(map(words, texts))

    model = PassRecorder()
    batcher = make_batcher(model, max_batch_size=64, length=words, max_batch_tokens=256)
    assert await batcher.submit(texts) == [text.upper() for text in texts]
    assert len(model.passes) > 1
    assert batcher.stats.real_tokens == real
    waste_budgeted = batcher.stats.padded_tokens - real
    waste_one_pass = one_pass_padded - real
    assert waste_budgeted < waste_one_pass / 4


async def test_a_failing_item_fails_only_its_request_within_passes(make_batcher):
    model = PassRecorder()
    batcher = make_batcher(model, max_batch_size=64, max_latency=0.05, length=words, max_batch_tokens=8)
    inputs = [["poison"] if i == 5 else [f"word{i} more"] for i in range(12)]
    outcomes = await asyncio.gather(*(batcher.submit(texts) for texts in inputs), return_exceptions=True)
    assert isinstance(outcomes[5], ModelError) and "poison cannot be echoed" in str(outcomes[5])
    assert [o for i, o in enumerate(outcomes) if i != 5] == [[f"WORD{i} MORE"] for i in range(12) if i != 5]


async def test_a_length_function_that_fails_refuses_only_that_request(make_batcher):
    model = PassRecorder()
    batcher = make_batcher(model, length=words, max_batch_tokens=100)
    with pytest.raises(InputError, match="cannot measure the length"):
        await batcher.submit([42])  # int has no split()
    assert await batcher.submit(["still fine"]) == ["STILL FINE"]


def test_a_budget_needs_a_length_function():
    with pytest.raises(ValueError, match="length function"):
        Batcher(lambda batch: batch, max_batch_tokens=100)
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(lambda batch: batch, length=len, max_batch_tokens=0)


class DeclaresBudget:
    """A user model declaring its batching hints on the class (no batchserve import)."""

    max_batch_tokens = 64

    @staticmethod
    def batch_length(text: str) -> int:
        return len(text.split())

    def predict(self, batch: list) -> list:
        return [len(text) for text in batch]


async def test_a_model_declares_its_length_and_budget_and_the_setting_overrides_it():
    from batchserve.apps.base import make_batcher
    from batchserve.model import ModelSpec
    from batchserve.settings import Settings

    declared = make_batcher(ModelSpec(DeclaresBudget), Settings(), name="declared")
    assert declared.max_batch_tokens == 64 and declared.length("a b c") == 3
    overridden = make_batcher(ModelSpec(DeclaresBudget), Settings.from_options(max_batch_tokens=500), name="set")
    assert overridden.max_batch_tokens == 500
    plain = make_batcher(ModelSpec(lambda batch: batch), Settings.from_options(max_batch_tokens=500), name="plain")
    assert plain.max_batch_tokens is None  # no length function: the budget does not apply
    try:
        assert await declared.submit(["one two", "three"]) == [7, 5]
    finally:
        for batcher in (declared, overridden, plain):
            await batcher.close()


async def test_batch_sizes_count_dispatched_batches_and_passes_apart(make_batcher):
    # 32 texts in one dispatched batch, run as passes of a few rows: the batch is 32, not its passes
    rng = random.Random(5)
    texts = [sentence(rng, 3) if i % 2 else sentence(rng, 40) for i in range(32)]
    model = PassRecorder()
    batcher = make_batcher(model, max_batch_size=64, length=words, max_batch_tokens=256)
    assert await batcher.submit(texts) == [text.upper() for text in texts]
    stats = batcher.stats
    assert dict(stats.batch_sizes) == {32: 1} and stats.batches == 1 and stats.items == 32
    assert len(model.passes) > 1
    assert sorted(stats.pass_sizes.elements()) == sorted(len(piece) for piece in model.passes)
    assert sum(stats.pass_sizes.values()) == stats.passes == len(model.passes)


async def test_metrics_and_dashboard_report_batches_and_passes_apart(serve_app):
    from prometheus_client.parser import text_string_to_metric_families

    client = await serve_app(models=["tests.fakes:TokenBudgeted"], max_batch_size=64)
    texts = [("long " * 40).strip() if i % 2 else "short text" for i in range(32)]
    assert (await client.post("/models/TokenBudgeted/predict", json={"inputs": texts})).status_code == 200
    families = {family.name: family for family in text_string_to_metric_families((await client.get("/metrics")).text)}

    def count(name: str) -> float:
        return next(s.value for s in families[name].samples if s.name == f"{name}_count")

    assert count("batchserve_batch_size") == 1  # one dispatched batch of 32
    assert next(s.value for s in families["batchserve_batch_size"].samples if s.name.endswith("_sum")) == 32
    passes = count("batchserve_pass_size")
    assert passes > 1 and families["batchserve_pass_size"].documentation.startswith("Rows per call of the model")
    model = (await client.get("/dashboard/stats")).json()["models"]["TokenBudgeted"]
    assert model["batches"] == 1 and model["items"] == 32 and model["batch_sizes"] == {"32": 1}
    assert model["passes"] == passes and model["pass_rows"] == 32 and model["token_budget"] == 256
    page = (await client.get("/dashboard")).text
    assert "Mean dispatched batch size per second (and rows per pass, with a token budget)" in page
    assert "Dispatched batch sizes since this page opened" in page and "rows per pass`" in page
