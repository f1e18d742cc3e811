"""What the OpenAI text routes (``/v1/completions``, ``/v1/chat/completions``) share.

* :class:`SamplingFields`: the request fields both take (``n``, ``temperature``, ``top_p``,
  ``stop``, ``seed``, ``stream``...) with their limits stated in the schema;
* :func:`submit_all`: one engine request per prompt, withdrawn together if one is refused;
* :func:`results`: every request's completion, the generations cancelled if the client leaves;
* :func:`event_stream` / :func:`sse_response`: the server-sent events of a stream (opening
  chunks, a chunk per delta as it comes, the usage chunk, ``data: [DONE]``);
* :func:`not_supported`: a validator for OpenAI fields these routes do not implement;
* :func:`logprobs_vocabulary`: the model's tokens, for the ``logprobs`` of an answer;
* :class:`ResponseFormat` and :func:`compiled_constraint`: ``response_format``, the constraint
  every choice's tokens are kept to (OpenAI's JSON modes; ``regex`` and ``grammar`` extensions).

Each route supplies only its own shapes (a completion's ``text``, a chat message's ``delta``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Callable, Iterable, Literal

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from batchserve.apps.llm import GenerationHost, cancel_on_disconnect
from batchserve.apps.openai import texts_of, usage
from batchserve.errors import BatchserveError, InputError
from batchserve.generation import ChoiceDelta, Completion, GenerationEngine, GenerationRequest, SamplingParams
from batchserve.generation.constraint import CompiledConstraint, Constraint
from batchserve.server.json_response import dumps
from batchserve.server.openai_errors import error_body
from batchserve.tokens import Vocabulary

MAX_N = 16
MAX_TOKENS = 4096
MAX_STOPS = 4
MAX_STOP_CHARS = 256
DONE = b"data: [DONE]\n\n"

Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


MAX_LOGIT_BIAS = 1024  # tokens a request may bias


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64, description="the schema's name (OpenAI asks for one; not used)")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema every choice is kept to")
    strict: bool | None = Field(None, description="either way, the output is kept to the schema")


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``, and two batchserve extensions: ``{"type": "regex", "regex":
    "..."}`` and ``{"type": "grammar", "grammar": "...", "syntax": "lark" | "gbnf"}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JsonSchemaFormat | None = None
    regex: str | None = Field(None, min_length=1, description='with type "regex": the regular expression the text matches')
    grammar: str | None = Field(None, min_length=1, description='with type "grammar": a Lark (or GBNF) grammar')
    syntax: Literal["lark", "gbnf"] = Field("lark", description="the grammar's syntax")

    @model_validator(mode="after")
    def check_fields(self) -> "ResponseFormat":
        needed = {"json_schema": self.json_schema, "regex": self.regex, "grammar": self.grammar}
        if self.type in needed and needed[self.type] is None:
            raise ValueError(f'type "{self.type}" needs the field "{self.type}"')
        for field, value in needed.items():
            if value is not None and field != self.type:
                raise ValueError(f'"{field}" goes with type "{field}", not "{self.type}"')
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "json_schema":
            return Constraint("json_schema", json.dumps(self.json_schema.schema_))
        if self.type == "regex":
            return Constraint("regex", self.regex)
        if self.type == "grammar":
            if self.syntax == "gbnf":
                return Constraint("gbnf", self.grammar)
            return Constraint("grammar", self.grammar)
        return Constraint("json_object") if self.type == "json_object" else None


async def compiled_constraint(engine: GenerationEngine, response_format: ResponseFormat | None) -> CompiledConstraint | None:
    """The request's constraint checked and compiled for the model (in a thread: a grammar may
    take a while); a 422 naming an unsupported feature."""
    constraint = response_format.constraint() if response_format is not None else None
    if constraint is None:
        return None
    return await asyncio.to_thread(engine.constraints.compile, constraint)


class SamplingFields(BaseModel):
    """Request fields shared by completions and chat completions; an unknown field is a 422."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the served model (GET /v1/models); absent: the one this route serves")
    n: int = Field(1, ge=1, le=MAX_N, description="choices; they share one prefill")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: off (an extension to OpenAI's parameters)")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = Field(
        None, description=f"up to {MAX_STOPS} strings that end a choice (not included)"
    )
    seed: int | None = None
    ignore_eos: bool = Field(False, description="generate max_tokens even past end-of-sequence (an extension)")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="subtracted from the logit of a token the choice already drew")
    frequency_penalty: float = Field(
        0.0, ge=-2, le=2, description="times the number of times the choice drew a token, subtracted from its logit"
    )
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (a string) → added to its logit (-100 to 100; -100 bans it, 100 all but forces it)"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")

    @field_validator("stop", mode="before")
    @classmethod
    def check_stop(cls, value: Any) -> Any:
        if value is None:
            return value
        stops = texts_of(value, "stop")
        if len(stops) > MAX_STOPS or any(not 0 < len(stop) <= MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens")
        for key in value:
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids (as strings), not {key[:40]!r}")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self, max_tokens: int, logprobs: int | None = None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stops,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items()),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def not_supported(noop: Iterable[Any] = (), reason: str = "") -> classmethod:
    """A before-validator for OpenAI fields a route does not implement: null and the values
    in ``noop`` (that change nothing) pass as null; anything else is a 422 naming the field."""
    harmless = list(noop)
    detail = f" ({reason})" if reason else ""

    def check(cls, value: Any) -> None:
        if value is None or any(value == allowed and type(value) is type(allowed) for allowed in harmless):
            return None
        raise PydanticCustomError("unsupported_parameter", "not supported by this server{detail}", {"detail": detail})

    return classmethod(check)


def logprobs_vocabulary(host: GenerationHost) -> Vocabulary:
    """The vocabulary that writes out an answer's ``logprobs`` (its tokens' text and bytes)."""
    if host.vocabulary is None:
        raise InputError("logprobs need the model's fast tokenizer, and this model has none", param="logprobs")
    return host.vocabulary


def response_header(prefix: str, kind: str, model: str) -> dict[str, Any]:
    """``id``, ``object``, ``created``, ``model``: the fields every response and chunk starts with."""
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()), "model": model}


def submit_all(
    engine: GenerationEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    n: int,
    timeout: float,
    streamed: bool,
    constraint: CompiledConstraint | None = None,
) -> list[GenerationRequest]:
    """One engine request per prompt; if one is refused, the ones already queued are withdrawn."""
    generations: list[GenerationRequest] = []
    try:
        for prompt_ids in prompts:
            generations.append(engine.submit(prompt_ids, params, n=n, timeout=timeout, streamed=streamed, constraint=constraint))
    except BaseException:
        for generation in generations:
            generation.cancel()
        raise
    return generations


async def results(request: Request, generations: list[GenerationRequest]) -> list[Completion]:
    """Every generation's completion; all are cancelled if the HTTP client goes away first."""
    return await cancel_on_disconnect(request, generations, asyncio.gather(*(g.result() for g in generations)))


def total_usage(completions: list[Completion]) -> dict[str, int]:
    prompt_tokens = sum(completion.prompt_tokens for completion in completions)
    return usage(prompt_tokens, sum(completion.completion_tokens for completion in completions))


async def event_stream(
    generations: list[GenerationRequest],
    chunks: Callable[[int, ChoiceDelta], Iterable[dict]],
    opening: Iterable[dict] = (),
    usage_chunk: Callable[[dict[str, int]], dict] | None = None,
) -> AsyncIterator[bytes]:
    """Server-sent events: the ``opening`` chunks, then ``chunks(position, delta)`` for every
    delta of every generation as it comes (``position``: the generation's place in the list),
    then ``usage_chunk(usage)`` when given, then ``data: [DONE]``.

    An engine error on the way is one OpenAI error event, then ``[DONE]``; the generations
    are cancelled however the stream ends (a client that leaves closes it).
    """
    completion_tokens: dict[tuple[int, int], int] = {}
    try:
        for payload in opening:
            yield sse(payload)
        async for position, delta in merged(generations):
            completion_tokens[position, delta.index] = delta.tokens
            for payload in chunks(position, delta):
                yield sse(payload)
        if usage_chunk is not None:
            prompt_tokens = sum(len(generation.prompt_ids) for generation in generations)
            yield sse(usage_chunk(usage(prompt_tokens, sum(completion_tokens.values()))))
        yield DONE
    except BatchserveError as error:
        yield sse(error_body(error.status_code, error.kind, error.message, error.param))
        yield DONE
    finally:
        for generation in generations:
            generation.cancel()


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


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


def sse(payload: dict) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"
