"""Text infilling: ``POST /infill`` ``{"text": "twinkle twinkle [MASK] star."}`` → the filled text.

With the bundled causal LM, each mask is filled by *propose, then rescore*: the candidates
are the most probable next words after the text before the mask, plus the first one to
three words of short sampled continuations (``n`` rows sharing one prefill); the candidate
that makes the sentence most probable wins (scored from a line break, so the first word
counts too, up to :data:`SUFFIX_WORDS` words after the mask).  Masks are filled left to
right.  The candidates of concurrent requests are scored together
(:class:`~batchserve.generation.scoring.ScoringQueue`: shared passes, each text's prefix run
once, a text two requests share scored once), and concurrent requests with the same text
before the mask and the same seed share one set of proposals
(:class:`~batchserve.aio.SharedWork`).  The model and engine are the generation app's.
"""

from __future__ import annotations

import asyncio
import re
import time

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from batchserve.aio import SharedWork
from batchserve.apps.base import Service, deadline_dependency
from batchserve.apps.llm import GenerationHost, GenerationService, cancel_on_disconnect, host_for
from batchserve.errors import DeadlineExceededError, InputError
from batchserve.generation import GenerationEngine, SamplingParams
from batchserve.generation.scoring import ScoringQueue, next_token_texts
from batchserve.settings import Settings

MASK = "[MASK]"
MAX_MASKS = 8
SAMPLES = 8
NEXT_TOKENS = 40
SPAN_TOKENS = 6
MAX_WORDS = 3
WORD = re.compile(r"\S+")
#: what proposals and scores start from: a line break, so the text's first word is scored
#: (as the start of a line) rather than given, and a mask at the start has a context
START = "\n"
#: words after the mask a candidate's score counts: farther ones depend little on the fill,
#: and each costs every candidate a token (a long sentence's 48 candidates: seconds)
SUFFIX_WORDS = 12
SCORED_SUFFIX = re.compile(r"(?:\s*\S+){0,%d}" % SUFFIX_WORDS)


class InfillRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo is a 422, not a default silently used

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


async def propose(engine: GenerationEngine, context: str, seed: int | None, deadline: float) -> tuple[list[str], list[str]]:
    """The most probable next tokens after ``context``, and :data:`SAMPLES` short sampled
    continuations of it (rows sharing one prefill); the rows are freed if this is cancelled."""
    sampled = engine.submit(
        engine.encode(context), SamplingParams(max_tokens=SPAN_TOKENS, temperature=0.9, top_k=40, seed=seed),
        n=SAMPLES, timeout=seconds_left(deadline), streamed=False,
    )
    try:
        next_tokens = await before(deadline, engine.call(next_token_texts, context, NEXT_TOKENS))
        result = await sampled.result()
    finally:
        sampled.cancel()  # a no-op once it has finished
    return next_tokens, [choice.text for choice in result.choices]


async def shared_proposals(
    engine: GenerationEngine, proposals: SharedWork, context: str, seed: int | None, deadline: float
) -> tuple[list[str], list[str]]:
    """:func:`propose`, done once for concurrent requests with the same context and seed (the
    same proposals: a seed repeats them); a request whose own deadline is later than the
    one the shared work ran to asks again."""
    key = None if seed is None else (context, seed)
    while True:
        try:
            return await proposals.run(key, lambda: propose(engine, context, seed, deadline))
        except DeadlineExceededError:
            if time.monotonic() >= deadline:
                raise


async def fill_one(
    engine: GenerationEngine, scorer: ScoringQueue, proposals: SharedWork, request: Request, prefix: str, suffix: str,
    seed: int | None, deadline: float,
):
    """The best fill for the mask between ``prefix`` and ``suffix``, and every candidate's score."""
    context = START + prefix.rstrip()
    next_tokens, continuations = await cancel_on_disconnect(
        request, [], shared_proposals(engine, proposals, context, seed, deadline)
    )
    fills = candidate_fills(next_tokens, continuations, suffix)
    if not fills:
        raise InputError("no candidate fill was found for the mask")
    separator = " " if prefix and not prefix[-1].isspace() else ""
    scored_suffix = SCORED_SUFFIX.match(suffix).group(0)
    texts = [START + joined(prefix, separator + fill, scored_suffix) for fill in fills]
    scores = await cancel_on_disconnect(request, [], before(deadline, scorer.text_logprobs(texts, deadline)))
    ranked = sorted(zip(fills, scores), key=lambda pair: -pair[1])
    return separator + ranked[0][0], ranked


def build_router(host: GenerationHost, settings: Settings) -> APIRouter:
    router = APIRouter(tags=["infill"])
    request_timeout = deadline_dependency(settings)
    scorer = ScoringQueue(host.running_engine)  # the candidates of concurrent requests scored together
    proposals = SharedWork()  # the proposals of concurrent requests alike made once

    @router.post("/infill", summary=f"Fill each {MASK} of a text")
    async def infill(body: InfillRequest, request: Request, timeout: float = Depends(request_timeout)):
        parts = body.text.split(MASK)
        engine = host.running_engine()
        deadline = time.monotonic() + timeout  # one deadline for every mask and step
        text, fills = parts[0], []
        for suffix in parts[1:]:
            fill, ranked = await fill_one(engine, scorer, proposals, request, text, suffix, body.seed, deadline)
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
