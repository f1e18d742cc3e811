"""The official openai client, sync and async, streaming and not, against a real
`batchserve serve --app generation --app embeddings` on loopback: models, chat, completions,
embeddings, and the typed errors it raises.  One server for the module; few small generations."""

from __future__ import annotations

import asyncio
import enum
import json
import re

import numpy as np
import openai
import pytest
import pytest_asyncio
from pydantic import BaseModel, Field

from tests.conftest import ServerProcess

LLM = "SmolLM2-135M-Instruct"
EMBEDDER = "all-MiniLM-L6-v2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
on_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def server():
    server = ServerProcess(
        "--app", "generation", "--app", "embeddings", "--generation-threads", "1", "--timeout", "120", ready_timeout=300
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def aclient(server):
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0) as client:
        yield client


def test_models_list_and_retrieve(client):
    assert sorted(model.id for model in client.models.list()) == sorted([LLM, EMBEDDER])
    assert client.models.retrieve(LLM).owned_by == "batchserve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_sync_whole_and_streamed(client):
    whole = client.chat.completions.create(model=LLM, messages=QUESTION, max_tokens=6, temperature=0)
    (choice,) = whole.choices
    # the greedy answer is the runtime's: fp32 torch starts "The capital...", llama.cpp's Q4_1 kernels
    # "L'Étoile" (their first two tokens are 0.09 logits apart)
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert whole.usage.prompt_tokens > 10 and whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = client.chat.completions.create(
        model=LLM, messages=QUESTION, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == choice.message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@on_module_loop
async def test_chat_async_whole_and_streamed(aclient):
    whole, stream = await asyncio.gather(
        aclient.chat.completions.create(model=LLM, messages=QUESTION, n=2, max_completion_tokens=4, seed=7),
        aclient.chat.completions.create(model=LLM, messages=QUESTION, n=2, max_completion_tokens=4, seed=7, stream=True),
    )
    streamed = {0: "", 1: ""}
    async for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert {choice.index: choice.message.content for choice in whole.choices} == streamed  # same seed, same text


def test_completions_sync_whole_and_streamed(client):
    whole = client.completions.create(model=LLM, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert whole.choices[0].text.startswith(" Paris") and whole.model == LLM
    chunks = list(client.completions.create(model=LLM, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text


@on_module_loop
async def test_completions_async_whole_and_streamed(aclient):
    whole = await aclient.completions.create(model=LLM, prompt=["Once upon a time", "The sky is"], max_tokens=3, n=2, seed=1)
    assert sorted(choice.index for choice in whole.choices) == [0, 1, 2, 3]
    texts = {}
    async for chunk in await aclient.completions.create(
        model=LLM, prompt=["Once upon a time", "The sky is"], max_tokens=3, n=2, seed=1, stream=True
    ):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {choice.index: choice.text for choice in whole.choices}


def test_embeddings_sync(client):
    # the client asks for base64 unless told, and decodes it
    default, floats = (
        client.embeddings.create(model=EMBEDDER, input=["a dog", "a cat"]),
        client.embeddings.create(model=EMBEDDER, input=["a dog", "a cat"], encoding_format="float"),
    )
    assert [len(item.embedding) for item in default.data] == [384, 384]
    np.testing.assert_allclose(default.data[1].embedding, floats.data[1].embedding, atol=1e-6)
    assert default.usage.prompt_tokens > 0


@on_module_loop
async def test_embeddings_async(aclient):
    reply = await aclient.embeddings.create(model=EMBEDDER, input="hello world")
    vector = np.array(reply.data[0].embedding)
    assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-3


def test_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as wrong_model:
        client.chat.completions.create(model=EMBEDDER, messages=QUESTION, max_tokens=1)
    assert wrong_model.value.code == "model_not_found" and "/v1/chat/completions" in wrong_model.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=LLM, input="x")
    with pytest.raises(openai.UnprocessableEntityError) as tools:
        client.chat.completions.create(
            model=LLM, messages=QUESTION, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]
        )
    assert tools.value.param == "tools" and tools.value.code == "unsupported_parameter"
    with pytest.raises(openai.UnprocessableEntityError) as too_long:
        client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "hi " * 9000}], max_tokens=1)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.UnprocessableEntityError) as bad_n:
        client.completions.create(model=LLM, prompt="x", n=99)
    assert bad_n.value.param == "n" and bad_n.value.type == "invalid_request_error"


def test_chat_logprobs_greedy_token_is_the_likeliest_whatever_the_temperature(client):
    asked = {"model": LLM, "messages": QUESTION, "max_tokens": 8, "logprobs": True, "top_logprobs": 5}
    reply = client.chat.completions.create(**asked, temperature=0)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens - (choice.finish_reason == "stop")  # the end token has none
    assert b"".join(bytes(item.bytes) for item in content).decode() == choice.message.content
    for item in content:
        assert len(item.top_logprobs) == 5 and isinstance(item.token, str)
        assert item.logprob == max(top.logprob for top in item.top_logprobs) == item.top_logprobs[0].logprob
        assert item.token == item.top_logprobs[0].token and item.logprob <= 0
        assert sum(np.exp(top.logprob) for top in item.top_logprobs) <= 1 + 1e-6
    # the model's distribution, not the one sampled from: the first position's alternatives are the same hot
    hot = client.chat.completions.create(**asked, temperature=1.5, top_p=0.5, seed=3).choices[0].logprobs.content[0]
    assert [top.token for top in hot.top_logprobs] == [top.token for top in content[0].top_logprobs]
    assert np.allclose([top.logprob for top in hot.top_logprobs], [top.logprob for top in content[0].top_logprobs], atol=1e-3)
    # a stream carries its tokens' logprobs, the same as the whole answer's
    streamed = [
        item
        for chunk in client.chat.completions.create(**asked, temperature=0, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for item in chunk.choices[0].logprobs.content
    ]
    assert [item.token for item in streamed] == [item.token for item in content]
    assert np.allclose([item.logprob for item in streamed], [item.logprob for item in content], atol=1e-3)


def test_completions_logprobs_in_the_legacy_shape_whole_and_streamed(client):
    asked = {"model": LLM, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    choice = client.completions.create(**asked).choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset)
    for token, logprob, top, offset in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, logprobs.text_offset):
        assert choice.text[offset:].startswith(token)
        assert len(top) <= 3 and logprob == max(top.values()) and top[token] == logprob
    chunks = [chunk.choices[0] for chunk in client.completions.create(**asked, stream=True) if chunk.choices]
    assert [token for chunk in chunks if chunk.logprobs for token in chunk.logprobs.tokens] == logprobs.tokens
    assert [offset for chunk in chunks if chunk.logprobs for offset in chunk.logprobs.text_offset] == logprobs.text_offset
    plain = client.completions.create(**{**asked, "logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].text == choice.text
    for bad, field in (({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"echo": True}, "logprobs")):
        with pytest.raises(openai.UnprocessableEntityError) as raised:
            client.completions.create(**{**asked, **bad})
        assert raised.value.body["param"] == field, raised.value.body


class Colour(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(min_length=1, max_length=16)
    zip_code: int = Field(ge=10000, le=99999)


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=16)
    age: int = Field(ge=0, le=120)
    likes_tea: bool
    colour: Colour
    address: Address


PERSON_QUESTION = [
    {"role": "system", "content": "You answer in JSON."},
    {"role": "user", "content": "Describe a person who lives in Paris."},
]


def test_parse_with_a_pydantic_model_gives_n_valid_objects(client):
    reply = client.chat.completions.parse(
        model=LLM, messages=PERSON_QUESTION, response_format=Person, n=3, temperature=0.8, max_tokens=120, seed=1
    )
    assert len(reply.choices) == 3
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        person = choice.message.parsed
        assert isinstance(person, Person) and isinstance(person.colour, Colour) and isinstance(person.address, Address)
        assert Person.model_validate_json(choice.message.content) == person  # the bounds hold (pydantic checks them)


def test_json_object_mode_streamed_and_a_constrained_row_cut_at_max_tokens(client):
    asked = {"model": LLM, "messages": PERSON_QUESTION, "response_format": {"type": "json_object"}, "temperature": 0}
    text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(**asked, max_tokens=200, stream=True)
        if chunk.choices
    )
    assert isinstance(json.loads(text), dict)
    with pytest.raises(openai.LengthFinishReasonError):  # the client's own error, as with OpenAI
        client.chat.completions.parse(**{**asked, "response_format": Person}, max_tokens=5)


def test_regex_constrained_completion_and_bad_constraints_are_422s(client):
    regex = {"type": "regex", "regex": r"[0-9]{3}-[a-z]{2,5}"}
    completion = client.completions.create(
        model=LLM, prompt="A code:", max_tokens=20, temperature=1.0, n=3, seed=2, extra_body={"response_format": regex}
    )
    for choice in completion.choices:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", choice.text) and choice.finish_reason == "stop", choice.text
    bad = {
        "uniqueItems": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
        "look-around": {"type": "regex", "regex": "(?=a)b"},
        "needs the field": {"type": "json_schema"},
    }
    for expected, response_format in bad.items():
        with pytest.raises(openai.UnprocessableEntityError) as raised:
            client.chat.completions.create(model=LLM, messages=QUESTION, max_tokens=2, response_format=response_format)
        assert expected in raised.value.body["message"] and raised.value.body["param"].startswith("response_format")
