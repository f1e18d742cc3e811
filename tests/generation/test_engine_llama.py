"""The continuous-batching engine on the llama.cpp runtime (bundled SmolLM2 GGUF, prefix cache on).

Greedy equivalence per runtime: requests that join the running batch at different decode
steps each get the tokens the same runtime gives for their prompt alone (up to a near tie:
llama.cpp's kernels round differently with the batch, see tests/runtimes/llama/test_lm.py).
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make installs it): no llama.cpp runtime to test")

from batchserve.errors import ModelError  # noqa: E402
from batchserve.generation import EngineLimits, GenerationEngine, SamplingParams  # noqa: E402
from batchserve.runtimes.llama.lm import LlamaCausalLM  # noqa: E402
from tests.generation.engine_helpers import MAX_TOKENS, PROMPTS, greedy_results_joining_at_distinct_steps  # noqa: E402

#: logits: top two closer than this are a tie llama.cpp's rounding may break either way
MARGIN = 1.0


@pytest.fixture(scope="module")
def llama():
    runtime = LlamaCausalLM.load(max_sequences=16, threads=1)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def engine(llama):
    engine = GenerationEngine(llama, EngineLimits(max_rows=16, max_waiting_rows=24))
    engine.start()
    yield engine
    engine.stop()


def alone(lm, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of the prompt alone on the runtime (stopping at a stop token), and each
    choice's top-two gap.  Run through ``engine.call``: between two steps, on sequence 15."""
    logits = lm.prefill([15], [prompt_ids])
    tokens, margins = [], []
    for _ in range(max_tokens):
        top = logits[0].topk(2)
        tokens.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        if tokens[-1] in lm.stop_tokens or len(tokens) == max_tokens:
            break
        logits = lm.decode([15], [tokens[-1]])
    lm.release([15])
    return tokens, margins


def assert_same_greedy(got: list[int], expected: list[int], margins: list[float], what: str) -> None:
    for index, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            assert margins[index] < MARGIN, f"{what}: token {index}: {a} != {b}, top two {margins[index]:.2f} apart"
            return
    assert got == expected, what


async def idle(engine: GenerationEngine) -> None:
    async with asyncio.timeout(30):
        while engine.active_rows or engine.waiting_requests:
            await asyncio.sleep(0.01)


async def test_greedy_rows_joining_at_different_steps_match_the_runtime_alone(llama, engine):
    expected = [await engine.call(alone, engine.encode(prompt), MAX_TOKENS) for prompt in PROMPTS]
    results = await greedy_results_joining_at_distinct_steps(engine)
    for prompt, result, (tokens, margins) in zip(PROMPTS, results, expected):
        assert_same_greedy(result.choices[0].token_ids, tokens, margins, prompt)
    await idle(engine)
    assert llama.live == []  # every finished row's sequence was released


async def test_n_greedy_alternatives_each_match_the_prompt_alone(engine):
    prompt = engine.encode("Once upon a time, in a small village,")
    tokens, margins = await engine.call(alone, prompt, 6)
    result = await engine.submit(prompt, SamplingParams(max_tokens=6, temperature=0), n=3, timeout=120).result()
    for choice in result.choices:
        assert_same_greedy(choice.token_ids, tokens, margins, f"choice {choice.index}")


async def test_seeded_alternatives_differ_and_repeat_when_run_alike(engine):
    """Seeds repeat when the passes are the same: from an empty KV cache both times.  (A
    prefix-cache hit or other cells in between may round the logits differently, and a
    sampled token may change where its draw falls at a boundary.)"""
    prompt = engine.encode("My favourite animal is the")
    params = SamplingParams(max_tokens=6, temperature=1.0, top_k=50, seed=1234)
    await engine.call(LlamaCausalLM.drop_prefix_cache)
    first = await engine.submit(prompt, params, n=3, timeout=120).result()
    await idle(engine)
    await engine.call(LlamaCausalLM.drop_prefix_cache)
    second = await engine.submit(prompt, params, n=3, timeout=120).result()
    texts = [choice.text for choice in first.choices]
    assert len(set(texts)) > 1, texts
    assert texts == [choice.text for choice in second.choices]


async def test_the_prefix_cache_survives_the_idle_engine_and_serves_the_next_tab(llama, engine):
    document = (
        "The lighthouse stood at the edge of the northern cliffs, where the sea was grey for most of the year. "
        "Its keeper, an old man named Tobias, had lived there alone for thirty years."
    )
    greedy = SamplingParams(max_tokens=4, temperature=0)
    await engine.submit(engine.encode(document), greedy, timeout=120).result()
    async with asyncio.timeout(30):  # the engine idles: it clears the runtime's sequences
        while not engine.describe()["idle"]:
            await asyncio.sleep(0.05)
    before = llama.prefix_cache_stats()
    typed = engine.encode(document + " Every evening he")
    await engine.submit(typed, greedy, timeout=120).result()
    stats = llama.prefix_cache_stats()
    assert stats["hits"] == before["hits"] + 1
    assert stats["reused_tokens"] - before["reused_tokens"] >= len(engine.encode(document)) - 2


async def test_a_refused_prompt_fails_only_its_request(llama, engine):
    running = engine.submit(engine.encode("The capital of France is"), SamplingParams(max_tokens=MAX_TOKENS, temperature=0), timeout=300)
    async with asyncio.timeout(60):
        while running.admitted_step is None:
            await asyncio.sleep(0.005)
    bad = engine.submit([llama.n_vocab + 10], SamplingParams(max_tokens=4, temperature=0), n=2, timeout=60)
    with pytest.raises(ModelError, match="not in the vocabulary"):
        await bad.result()
    result = await running.result()
    assert result.choices[0].tokens == MAX_TOKENS or result.choices[0].finish_reason == "stop"
    await idle(engine)
    assert llama.live == []


async def test_a_constrained_and_a_free_request_in_one_batch_each_get_what_they_asked(engine):
    import json

    from batchserve.generation.constraint import Constraint

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "big": {"type": "boolean"}},
        "required": ["city", "big"],
        "additionalProperties": False,
    }
    compiled = engine.constraints.compile(Constraint("json_schema", json.dumps(schema)))
    free_prompt = engine.encode("Once upon a time, in a small village,")
    tokens, margins = await engine.call(alone, free_prompt, 8)
    requests = [
        engine.submit(engine.encode("A city as JSON:"), SamplingParams(max_tokens=40, temperature=0.8, seed=9), n=2,
                      timeout=120, constraint=compiled),
        engine.submit(free_prompt, SamplingParams(max_tokens=8, temperature=0), timeout=120),
    ]
    constrained, free = await asyncio.gather(*(request.result() for request in requests))
    # admitted together, or the free one a step later (the engine may wake between the two submits): either way
    # it decodes in the constrained rows' steps, which take more than one (a JSON object is many tokens)
    assert 0 <= requests[1].admitted_step - requests[0].admitted_step <= 1
    assert_same_greedy(free.choices[0].token_ids, tokens, margins, "the free row")
    for choice in constrained.choices:
        value = json.loads(choice.text)
        assert set(value) == {"city", "big"} and len(value["city"]) <= 12 and isinstance(value["big"], bool), choice.text
