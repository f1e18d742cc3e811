"""What the engine tests share, whichever runtime runs under the engine."""

from __future__ import annotations

import asyncio

from batchserve.generation import GenerationEngine, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a little",
    "Here is a list of fruits: apple, banana,",
    "The quick brown fox",
    "In 1969, the first man to walk on the moon was",
]
MAX_TOKENS = 8


async def wait_for_step(engine: GenerationEngine, step: int, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while engine.steps < step:
            await asyncio.sleep(0.005)


async def greedy_results_joining_at_distinct_steps(engine: GenerationEngine) -> list:
    """Submit each of PROMPTS greedily, the next only after the one before has run two
    decode steps (so each joins a running batch); their results, in order, once all end.
    Asserts that they joined at distinct steps, each while the one before still ran."""
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    requests = []
    for prompt in PROMPTS:
        request = engine.submit(engine.encode(prompt), greedy, timeout=300)
        requests.append(request)
        async with asyncio.timeout(60):
            while request.admitted_step is None:
                await asyncio.sleep(0.005)
        await wait_for_step(engine, request.admitted_step + 2)
    results = await asyncio.gather(*(request.result() for request in requests))
    joined_at = [request.admitted_step for request in requests]
    assert all(a < b for a, b in zip(joined_at, joined_at[1:])), f"requests should join at distinct steps: {joined_at}"
    assert all(b - a < MAX_TOKENS for a, b in zip(joined_at, joined_at[1:])), f"each joins a running batch: {joined_at}"
    return results
