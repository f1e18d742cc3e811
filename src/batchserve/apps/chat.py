"""OpenAI-compatible ``POST /v1/chat/completions`` on the generation engine.

The conversation is rendered by the model's own chat template (from its tokenizer, with
the assistant's turn opened) and generated like a completion of that text: the same engine,
the same continuous batch, ``n`` choices from one prefill.  So greedy chat output equals a
greedy ``/v1/completions`` of the rendered template.

A stream sends, per choice, a chunk with ``delta.role`` first, then ``delta.content``
chunks as text comes, then a chunk with its ``finish_reason``; then the usage chunk when
``stream_options.include_usage`` asks for it, then ``data: [DONE]``.

``logprobs: true`` (with ``top_logprobs``, 0 to 20) gives each choice's tokens'
log-probabilities in OpenAI's shape (:mod:`batchserve.apps.logprobs`), in the stream too.

``response_format`` keeps every choice to a JSON schema (``json_schema``), to any JSON
object (``json_object``), or (extensions) to a regular expression or a grammar: see
:mod:`batchserve.generation.constraint`.

OpenAI fields that would change the answer and are not implemented here (tools, audio...)
are refused with a 422 that names them, unless given their no-op value (null,
``tool_choice: "none"``...).  Unknown fields are refused too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from batchserve.apps.llm import GenerationHost
from batchserve.apps.logprobs import chat_logprobs
from batchserve.apps.openai import served_model
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
from batchserve.errors import ContextLengthError, InputError
from batchserve.generation import MAX_TOP_LOGPROBS, GenerationEngine
from batchserve.server.openai_errors import MODEL_NOT_FOUND

ROUTE = "/v1/chat/completions"
MAX_MESSAGES = 1024
#: max_tokens when neither max_tokens nor max_completion_tokens is given (less if the context is fuller)
DEFAULT_MAX_TOKENS = 1024
ROLES = ("system", "developer", "user", "assistant")
#: why tools are refused: the bundled model's chat template renders a message's role and content only
NO_TOOLS = (
    "no tool calling: the bundled SmolLM2-135M-Instruct's chat template has no place for tools or tool calls; "
    "a model whose template renders `tools` (Qwen2.5-Instruct's, Llama 3.1 Instruct's) would allow it, "
    "which this server does not implement yet"
)


# --------------------------------------------------------------------------- schemas


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"] = Field(description="developer is taken as system")
    content: str | Annotated[list[TextPart], Field(min_length=1)] = Field(description="text, or text parts (joined by newlines)")
    name: str | None = Field(None, description="accepted and ignored (the chat template has no place for it)")
    tool_calls: None = Field(None, description="not supported")
    function_call: None = Field(None, description="not supported")

    check_tools = field_validator("tool_calls", "function_call", mode="before")(not_supported([[]], NO_TOOLS))

    @field_validator("role", mode="before")
    @classmethod
    def check_role(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ROLES:
            raise PydanticCustomError(
                "unsupported_value", "role '{role}' is not supported: use system, developer, user or assistant",
                {"role": value},
            )
        return value

    @field_validator("content", mode="before")
    @classmethod
    def check_parts(cls, value: Any) -> Any:
        texts = [value] if isinstance(value, str) else []
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise PydanticCustomError(
                        "unsupported_value", "only text content parts are supported, not '{kind}'", {"kind": kind}
                    )
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
        for text in texts:  # JSON can carry "\ud800"; no tokenizer can read it (the template's raised TypeError: a 500)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise PydanticCustomError(
                    "string_unicode", "Input should be a valid string, a lone surrogate at character {at} is not Unicode",
                    {"at": error.start},
                ) from None
        return value

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="deprecated by OpenAI for max_completion_tokens; either")
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS,
        description=f"default: {DEFAULT_MAX_TOKENS}, or what is left of the model's context if less",
    )
    # accepted and ignored: they do not change the answer
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = Field(None, description="ignored: there are no tools")
    # not implemented: null, or the value that changes nothing (named in the description), only
    tools: None = Field(None, description="not supported (null or [])")
    tool_choice: None = Field(None, description='not supported (null or "none")')
    functions: None = Field(None, description="not supported (null or [])")
    function_call: None = Field(None, description='not supported (null or "none")')
    response_format: ResponseFormat | None = Field(
        None, description="json_object, json_schema (each choice kept to the schema); extensions: regex, grammar"
    )
    logprobs: bool | None = Field(None, description="each choice's tokens with their log-probabilities (the model's distribution)")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="the likeliest tokens given at each position (needs logprobs: true)"
    )
    modalities: None = Field(None, description='not supported (null or ["text"])')
    audio: None = Field(None, description="not supported")
    prediction: None = Field(None, description="not supported")
    web_search_options: None = Field(None, description="not supported")
    reasoning_effort: None = Field(None, description="not supported")
    verbosity: None = Field(None, description="not supported")

    check_tools = field_validator("tools", "functions", mode="before")(
        not_supported([[]], NO_TOOLS)
    )
    check_tool_choice = field_validator("tool_choice", "function_call", mode="before")(
        not_supported(["none"], NO_TOOLS)
    )

    @field_validator("top_logprobs")
    @classmethod
    def check_top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise PydanticCustomError("invalid_value", "top_logprobs needs logprobs: true", {})
        return value

    @property
    def logprobs_asked(self) -> int | None:
        """What the engine computes: None, or how many top log-probabilities with each token's."""
        return (self.top_logprobs or 0) if self.logprobs else None
    check_modalities = field_validator("modalities", mode="before")(not_supported([["text"]], "text only"))
    check_others = field_validator("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity", mode="before")(
        not_supported()
    )

    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --------------------------------------------------------------------------- the model, as chat sees it
# The one place chat reads the tokenizer and the context size: adapt here if the engine's API changes.


def chat_prompt(engine: GenerationEngine, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation in the model's own chat template, the assistant's turn opened."""
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"the model {engine.name} has no chat template: use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # a template may refuse a conversation (raise_exception in Jinja)
        raise InputError(f"the model's chat template refused the conversation: {error}", param="messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes any special tokens


def context_size(engine: GenerationEngine) -> int:
    return engine.max_positions


def completion_budget(prompt_tokens: int, asked: int | None, context: int) -> int:
    """max_tokens for the request: what it asked, or the default; a 422 if it cannot fit."""
    if asked is None:
        if prompt_tokens >= context:
            raise ContextLengthError(
                f"the conversation ({prompt_tokens} tokens) fills the model's context of {context} tokens: "
                "shorten the messages", param="messages",
            )
        return min(DEFAULT_MAX_TOKENS, context - prompt_tokens)
    if prompt_tokens + asked > context:
        raise ContextLengthError(
            f"the model's context is {context} tokens, and this request needs {prompt_tokens + asked} "
            f"({prompt_tokens} for the messages, {asked} for the completion): shorten the messages or lower "
            "max_completion_tokens", param="messages",
        )
    return asked


# --------------------------------------------------------------------------- the route


def add_chat_route(router: APIRouter, host: GenerationHost, request_timeout) -> None:
    @router.post(
        ROUTE, summary="OpenAI-compatible chat completions (the model's chat template, n choices, SSE streaming)",
        responses=MODEL_NOT_FOUND,
    )
    async def chat_completions(body: ChatRequest, request: Request, timeout: float = Depends(request_timeout)):
        engine = host.running_engine()
        header = response_header("chatcmpl", "chat.completion", served_model(body.model, engine.name, ROUTE))
        prompt = chat_prompt(engine, [message.for_template() for message in body.messages])
        max_tokens = completion_budget(len(prompt), body.asked_tokens(), context_size(engine))
        vocabulary = logprobs_vocabulary(host) if body.logprobs else None
        constraint = await compiled_constraint(engine, body.response_format)
        sampling = body.sampling(max_tokens, body.logprobs_asked)
        generations = submit_all(engine, [prompt], sampling, body.n, timeout, body.stream, constraint)
        if body.stream:
            return sse_response(stream({**header, "object": "chat.completion.chunk"}, body, generations, vocabulary))
        completions = await results(request, generations)
        choices = [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.text, "refusal": None},
                "logprobs": chat_logprobs(choice.logprobs, vocabulary) if vocabulary is not None else None,
                "finish_reason": choice.finish_reason,
            }
            for choice in completions[0].choices
        ]
        return {**header, "choices": choices, "usage": total_usage(completions)}


def stream(header: dict, body: ChatRequest, generations, vocabulary=None):
    extra = {"usage": None} if body.include_usage else {}  # OpenAI: every chunk but the last has usage null

    def chunk(index: int, delta: dict, finish_reason: str | None, logprobs: dict | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**header, "choices": [choice], **extra}

    def chunks(_, delta):
        if vocabulary is not None and delta.logprobs:  # the tokens of this text (a piece may have none, or its text be held back)
            yield chunk(delta.index, {"content": delta.text}, None, chat_logprobs(delta.logprobs, vocabulary))
        elif delta.text:
            yield chunk(delta.index, {"content": delta.text}, None)
        if delta.finish_reason is not None:
            yield chunk(delta.index, {}, delta.finish_reason)

    opening = [chunk(index, {"role": "assistant", "content": ""}, None) for index in range(body.n)]
    usage_chunk = (lambda usage: {**header, "choices": [], "usage": usage}) if body.include_usage else None
    return event_stream(generations, chunks, opening, usage_chunk)
