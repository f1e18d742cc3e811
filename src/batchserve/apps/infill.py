"""Text infilling: ``POST /infill`` ``{"text": "twinkle twinkle [MASK] star."}`` → the filled text.

With the bundled causal LM, each mask is filled by *propose, then rescore*: the candidates
are the most probable next words after the text before the mask, plus the first one to
three words of short sampled continuations (``n`` rows sharing one prefill); the candidate
that makes the whole sentence, text after the mask included, most probable wins.  Masks are filled left to right.  The model and engine are the generation app's.
"""

from __future__ import annotations

import asyncio
import re
import time

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, field_validator

from batchserve.apps.base import Service, deadline_dependency
from batchserve.apps.llm import GenerationHost, GenerationService, cancel_on_disconnect, host_for
from batchserve.errors import DeadlineExceededError, InputError
from batchserve.generation import GenerationEngine, SamplingParams
from batchserve.generation.scoring import next_token_texts, text_logprobs
from batchserve.settings import Settings

MASK = "[MASK]"
MAX_MASKS = 8
SAMPLES = 8
NEXT_TOKENS = 40
SPAN_TOKENS = 6
MAX_WORDS = 3
WORD = re.compile(r"\S+")


class InfillRequest(BaseModel):
    text: str = Field(
        min_length=1, max_length=4000, pattern=re.escape(MASK), description=f"text with 1 to {MAX_MASKS} {MASK}"
    )
    candidates: int = Field(5, ge=1, le=20, description="how many scored candidates to return per mask")
    seed: int | None = Field(0, description="sampling seed for the candidates (null: random)")

    @field_validator("text", mode="before")
    @classmethod
    def check_masks(cls, value):
        if isinstance(value, str):
            if MASK not in value:
                raise ValueError(f"the text has no {MASK}")
            if value.count(MASK) > MAX_MASKS:
                raise ValueError(f"at most {MAX_MASKS} masks per text")
        return value


def candidate_fills(next_tokens: list[str], continuations: list[str], suffix: str) -> list[str]:
    """Whole-word next tokens, and the first 1..3 words of each continuation (cut where the
    text after the mask begins); distinct, in that order."""
    fills: dict[str, None] = {token.strip(): None for token in next_tokens if token.strip().isalnum()}
    anchor = suffix.strip().split(" ")[0] if suffix.strip() else ""
    for text in continuations:
        if anchor and anchor in text:
            text = text[: text.index(anchor)]
        words = WORD.findall(text.split("\n")[0])
        for count in range(1, min(MAX_WORDS, len(words)) + 1):
            fills[" ".join(words[:count])] = None
    return list(fills)


def joined(prefix: str, fill: str, suffix: str) -> str:
    return prefix + fill + suffix


def seconds_left(deadline: float) -> float:
    """Time until the request's deadline (monotonic clock); past it, the caller gets 504."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError("infill did not finish before the request's deadline")
    return left


async def before(deadline: float, awaitable):
    """``awaitable``'s result, or a 504 at the deadline (a queued engine call is then skipped)."""
    try:
        return await asyncio.wait_for(awaitable, seconds_left(deadline))
    except asyncio.TimeoutError:
        raise DeadlineExceededError("infill did not finish before the request's deadline") from None


async def fill_one(engine: GenerationEngine, request: Request, prefix: str, suffix: str, seed, deadline: float):
    """The best fill for the mask between ``prefix`` and ``suffix``, and every candidate's score."""
    context = prefix.rstrip() or "\n"
    prompt = engine.encode(context)
    sampled = engine.submit(
        prompt, SamplingParams(max_tokens=SPAN_TOKENS, temperature=0.9, top_k=40, seed=seed), n=SAMPLES,
        timeout=seconds_left(deadline),
    )
    next_tokens = await before(deadline, engine.call(next_token_texts, context, NEXT_TOKENS))
    result = await cancel_on_disconnect(request, [sampled], sampled.result())
    fills = candidate_fills(next_tokens, [choice.text for choice in result.choices], suffix)
    if not fills:
        raise InputError("no candidate fill was found for the mask")
    separator = " " if prefix and not prefix[-1].isspace() else ""
    texts = [joined(prefix, separator + fill, suffix) for fill in fills]
    scores = await cancel_on_disconnect(request, [], before(deadline, engine.call(text_logprobs, texts, deadline)))
    ranked = sorted(zip(fills, scores), key=lambda pair: -pair[1])
    return separator + ranked[0][0], ranked


def build_router(host: GenerationHost, settings: Settings) -> APIRouter:
    router = APIRouter(tags=["infill"])
    request_timeout = deadline_dependency(settings)

    @router.post("/infill", summary=f"Fill each {MASK} of a text")
    async def infill(body: InfillRequest, request: Request, timeout: float = Depends(request_timeout)):
        parts = body.text.split(MASK)
        engine = host.running_engine()
        deadline = time.monotonic() + timeout  # one deadline for every mask and step
        text, fills = parts[0], []
        for index, suffix in enumerate(parts[1:]):
            fill, ranked = await fill_one(engine, request, text, suffix, body.seed, deadline)
            text += fill + suffix
            fills.append(
                {
                    "fill": fill.strip(),
                    "candidates": [{"fill": f, "logprob": round(score, 4)} for f, score in ranked[: body.candidates]],
                }
            )
        return {"text": text, "fills": fills}

    return router


def build(settings: Settings) -> Service:
    host = host_for(settings)
    return GenerationService("infill", build_router(host, settings), host)
