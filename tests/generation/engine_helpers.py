"""What the engine tests share, whichever runtime runs under the engine."""

from __future__ import annotations

import asyncio

from batchserve.generation import GenerationEngine

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
