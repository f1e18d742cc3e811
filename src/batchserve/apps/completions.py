"""OpenAI-compatible ``POST /v1/completions``, plain JSON or streamed as server-sent events.

Each prompt of a request is one engine request with ``n`` rows; choice ``i`` of prompt
``p`` has index ``p * n + i``.  A stream sends one ``data:`` chunk per piece of new text,
a last chunk per choice with its ``finish_reason``, optionally a usage chunk, then
``data: [DONE]``.  What it shares with chat completions lives in :mod:`batchserve.apps.textgen`.

``logprobs: k`` (0 to 20; OpenAI's legacy API allowed 5) gives each choice's tokens with their
log-probabilities and the k likeliest tokens at each position, in the legacy shape
(:class:`batchserve.apps.logprobs.LegacyLogprobs`), each chunk of a stream with its tokens'.
``response_format`` (an extension here) constrains every choice as on chat.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from batchserve.apps.llm import GenerationHost
from batchserve.apps.logprobs import LegacyLogprobs
from batchserve.apps.openai import served_model, texts_of
from batchserve.apps.textgen import (
    MAX_TOKENS,
    ResponseFormat,
    SamplingFields,
    compiled_constraint,
    event_stream,
    logprobs_vocabulary,
    not_supported,
    response_header,
    results,
    sse_response,
    submit_all,
    total_usage,
)
from batchserve.generation import MAX_TOP_LOGPROBS
from batchserve.server.openai_errors import MODEL_NOT_FOUND

ROUTE = "/v1/completions"
MAX_PROMPTS = 32

Prompt = Annotated[str, Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"a prompt or a list of 1 to {MAX_PROMPTS} prompts"
    )
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    echo: bool = False
    best_of: int | None = Field(None, description="not supported: null, or equal to n (which changes nothing)")
    suffix: str | None = Field(None, description='not supported (null or "")')
    response_format: ResponseFormat | None = Field(
        None, description="an extension to OpenAI's completions, as on chat: json_object, json_schema, regex, grammar"
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS,
        description=f"each token's log-probability with the k likeliest tokens' (0 to {MAX_TOP_LOGPROBS}; not with echo)",
    )

    check_suffix = field_validator("suffix", mode="before")(not_supported([""], "no insertion: see /infill"))

    @field_validator("best_of")
    @classmethod
    def check_best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise PydanticCustomError("unsupported_parameter", "not supported by this server (only null, or equal to n)", {})
        return value

    @field_validator("logprobs", mode="before")
    @classmethod
    def check_logprobs(cls, value: Any) -> Any:
        if value is False:  # what some clients send for "none"
            return None
        if isinstance(value, bool):
            raise PydanticCustomError("int_type", "logprobs is a number here: how many likeliest tokens (0 to {most})",
                                      {"most": MAX_TOP_LOGPROBS})
        return value

    @field_validator("logprobs")
    @classmethod
    def check_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("echo"):
            raise PydanticCustomError(
                "unsupported_value", "logprobs with echo (the prompt's log-probabilities) is not supported", {}
            )
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def check_prompt(cls, value: Any) -> Any:
        prompts = texts_of(value, "prompt")
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        if any(not prompt for prompt in prompts):
            raise ValueError("prompts must not be empty strings")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def add_completions_route(router: APIRouter, host: GenerationHost, request_timeout) -> None:
    @router.post(ROUTE, summary="OpenAI-compatible text completions (n choices, SSE streaming)", responses=MODEL_NOT_FOUND)
    async def completions(body: CompletionRequest, request: Request, timeout: float = Depends(request_timeout)):
        engine = host.running_engine()
        header = response_header("cmpl", "text_completion", served_model(body.model, engine.name, ROUTE))
        prompts = [engine.encode(prompt) for prompt in body.prompts]
        vocabulary = logprobs_vocabulary(host) if body.logprobs is not None else None
        sampling = body.sampling(body.max_tokens, body.logprobs)
        constraint = await compiled_constraint(engine, body.response_format)
        generations = submit_all(engine, prompts, sampling, body.n, timeout, body.stream, constraint)
        if body.stream:
            return sse_response(stream(header, body, generations, vocabulary))
        choices = []
        finished = await results(request, generations)
        for prompt_index, (prompt, result) in enumerate(zip(body.prompts, finished)):
            for choice in result.choices:
                text = (prompt if body.echo else "") + choice.text
                logprobs = LegacyLogprobs(vocabulary).add(choice.logprobs) if vocabulary is not None else None
                choices.append(_choice(text, prompt_index * body.n + choice.index, choice.finish_reason, logprobs))
        return {**header, "choices": choices, "usage": total_usage(finished)}


def stream(header: dict, body: CompletionRequest, generations, vocabulary=None):
    offsets: dict[int, LegacyLogprobs] = {}  # per choice index: its text's offsets, from chunk to chunk

    def chunks(prompt_index: int, delta):
        index = prompt_index * body.n + delta.index
        logprobs = None
        if vocabulary is not None:
            logprobs = offsets.setdefault(index, LegacyLogprobs(vocabulary)).add(delta.logprobs)
        yield {**header, "choices": [_choice(delta.text, index, delta.finish_reason, logprobs)]}

    echoes = [
        {**header, "choices": [_choice(prompt, prompt_index * body.n + choice, None)]}
        for prompt_index, prompt in enumerate(body.prompts if body.echo else [])
        for choice in range(body.n)
    ]
    usage_chunk = (lambda usage: {**header, "choices": [], "usage": usage}) if body.include_usage else None
    return event_stream(generations, chunks, echoes, usage_chunk)


def _choice(text: str, index: int, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}
