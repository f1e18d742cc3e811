"""OpenAI-compatible ``POST /v1/completions``, plain JSON or streamed as server-sent events.

Each prompt of a request is one engine request with ``n`` rows; choice ``i`` of prompt
``p`` has index ``p * n + i``.  A stream sends one ``data:`` chunk per piece of new text,
a last chunk per choice with its ``finish_reason``, optionally a usage chunk, then
``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, field_validator

from batchserve.apps.llm import GenerationHost, cancel_on_disconnect
from batchserve.apps.openai import usage
from batchserve.apps.responses import dumps
from batchserve.errors import BatchserveError, InputError
from batchserve.generation import ChoiceDelta, GenerationEngine, GenerationRequest, SamplingParams

MAX_PROMPTS = 32
MAX_STOPS = 4
MAX_STOP_CHARS = 256
DONE = b"data: [DONE]\n\n"


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str | list[str] = Field(description="a prompt or a list of prompts")
    n: int = Field(1, ge=1, le=16, description="choices per prompt; they share one prefill")
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: off (an extension to OpenAI's parameters)")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end a choice (not included)")
    seed: int | None = None
    ignore_eos: bool = Field(False, description="generate max_tokens even past end-of-sequence (an extension)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = None
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def check_prompt(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        if any(not prompt for prompt in prompts):
            raise ValueError("prompts must not be empty strings")
        return value

    @field_validator("stop")
    @classmethod
    def check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOPS or any(not 0 < len(stop) <= MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def sampling(self) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(stops),
            ignore_eos=self.ignore_eos,
        )


def add_completions_route(router: APIRouter, host: GenerationHost, request_timeout) -> None:
    @router.post("/v1/completions", summary="OpenAI-compatible text completions (n choices, SSE streaming)")
    async def completions(body: CompletionRequest, request: Request, timeout: float = Depends(request_timeout)):
        if body.logprobs:
            raise InputError("logprobs are not supported")
        engine = host.running_engine()
        generations = submit_all(engine, body, timeout)
        header = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model or engine.name,
        }
        if body.stream:
            return StreamingResponse(
                stream_chunks(header, body, generations),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        results = await cancel_on_disconnect(request, generations, asyncio.gather(*(g.result() for g in generations)))
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for prompt_index, (prompt, result) in enumerate(zip(body.prompts, results)):
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            for choice in result.choices:
                choices.append(
                    {
                        "text": (prompt if body.echo else "") + choice.text,
                        "index": prompt_index * body.n + choice.index,
                        "logprobs": None,
                        "finish_reason": choice.finish_reason,
                    }
                )
        return {**header, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def submit_all(engine: GenerationEngine, body: CompletionRequest, timeout: float) -> list[GenerationRequest]:
    """One engine request per prompt; if one is refused, the ones already queued are withdrawn."""
    params = body.sampling()
    generations: list[GenerationRequest] = []
    try:
        for prompt in body.prompts:
            generations.append(engine.submit(engine.encode(prompt), params, n=body.n, timeout=timeout))
    except BaseException:
        for generation in generations:
            generation.cancel()
        raise
    return generations


async def stream_chunks(header: dict, body: CompletionRequest, generations: list[GenerationRequest]) -> AsyncIterator[bytes]:
    """SSE frames for every delta of every prompt, as they come; cancels all if the client leaves."""
    completion_tokens: dict[tuple[int, int], int] = {}
    try:
        if body.echo:
            for prompt_index, prompt in enumerate(body.prompts):
                for choice in range(body.n):
                    yield _frame(header, prompt_index * body.n + choice, prompt, None)
        async for prompt_index, delta in merged(generations):
            completion_tokens[prompt_index, delta.index] = delta.tokens
            yield _frame(header, prompt_index * body.n + delta.index, delta.text, delta.finish_reason)
        if body.stream_options and body.stream_options.include_usage:
            prompt_tokens = sum(len(g.prompt_ids) for g in generations)
            yield _sse({**header, "choices": [], "usage": usage(prompt_tokens, sum(completion_tokens.values()))})
        yield DONE
    except BatchserveError as error:
        yield _sse({"error": {"message": error.message, "type": error.kind}})
        yield DONE
    finally:
        for generation in generations:
            generation.cancel()


async def merged(generations: list[GenerationRequest]) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """The deltas of several requests in arrival order, tagged with the request's position."""
    if len(generations) == 1:
        async for delta in generations[0].stream():
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(position: int, generation: GenerationRequest) -> None:
        try:
            async for delta in generation.stream():
                await queue.put((position, delta))
            await queue.put(done)
        except BaseException as error:
            await queue.put(error)

    tasks = [asyncio.ensure_future(pump(position, g)) for position, g in enumerate(generations)]
    try:
        open_streams = len(tasks)
        while open_streams:
            item = await queue.get()
            if item is done:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def _frame(header: dict, index: int, text: str, finish_reason: str | None) -> bytes:
    choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
    return _sse({**header, "choices": [choice]})


def _sse(payload: dict) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"
