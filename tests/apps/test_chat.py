"""POST /v1/chat/completions on the bundled SmolLM2-135M-Instruct, in process (the generation
app behind an ASGI transport), one app for the module.  Prompts and max_tokens stay small:
every generated token is a forward pass on a shared 2-core CPU."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from batchserve.server.app import create_app
from batchserve.settings import Settings
from tests.conftest import wait_ready

MODEL = "SmolLM2-135M-Instruct"
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name one colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Why is the sky blue?"},
]
# the bundled model's own chat template, as transformers renders it (checked below)
RENDERED = (
    "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
    "<|im_start|>user\nName one colour.<|im_end|>\n"
    "<|im_start|>assistant\nBlue.<|im_end|>\n"
    "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
on_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http():
    # one torch thread: on a CPU shared with other tests, spinning OpenMP threads slow it down many times;
    # the torch runtime: these tests read its model directory (/readyz path: the tokenizer, the weights)
    app = create_app(Settings.from_options(apps=["generation"], generation_runtime="torch", generation_threads=1, timeout=120))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=300) as client:
            await wait_ready(client, 300)
            yield client


async def chat(http: httpx.AsyncClient, **body) -> dict:
    reply = await http.post("/v1/chat/completions", json={"messages": CONVERSATION, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


async def refused(http: httpx.AsyncClient, status: int = 422, **body) -> dict:
    reply = await http.post("/v1/chat/completions", json={"messages": CONVERSATION, "max_tokens": 1, **body})
    assert reply.status_code == status, reply.text
    return reply.json()["error"]


@on_module_loop
async def test_the_bundled_tokenizer_has_the_chat_template_rendered_here(http):
    from transformers import AutoTokenizer

    path = (await http.get("/readyz")).json()["services"]["generation"]["engine"]["path"]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tokenizer.chat_template
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == RENDERED


@on_module_loop
async def test_greedy_chat_equals_greedy_completion_of_the_rendered_template(http):
    greedy = {"max_tokens": 8, "temperature": 0}
    # the same conversation with the system turn as "developer" and text parts (joined by newlines)
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "You are a terse assistant."}]},
        *CONVERSATION[1:3],
        {"role": "user", "content": [{"type": "text", "text": "Why is"}, {"type": "text", "text": "the sky blue?"}]},
    ]
    joined = [*CONVERSATION[:3], {"role": "user", "content": "Why is\nthe sky blue?"}]
    as_chat, as_completion, with_parts, with_newline = await asyncio.gather(
        chat(http, model=MODEL, **greedy),
        http.post("/v1/completions", json={"model": MODEL, "prompt": RENDERED, **greedy}),
        chat(http, **greedy, messages=parts),
        chat(http, **greedy, messages=joined),
    )
    completion = as_completion.json()
    (choice,) = as_chat["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["message"]["content"] == completion["choices"][0]["text"]
    assert choice["finish_reason"] == completion["choices"][0]["finish_reason"]
    assert as_chat["usage"] == completion["usage"]  # the same prompt tokens, the same generated ones
    assert as_chat["object"] == "chat.completion" and as_chat["id"].startswith("chatcmpl-")
    assert as_chat["model"] == MODEL
    assert with_parts["choices"] == with_newline["choices"] and with_parts["usage"] == with_newline["usage"]


@on_module_loop
async def test_stream_sends_role_then_content_then_finish_then_usage_then_done(http):
    request = {"n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    reply = await http.post(
        "/v1/chat/completions",
        json={"messages": CONVERSATION, **request, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: "):] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["model"] == MODEL for chunk in chunks)

    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 2
    assert all(chunk["usage"] is None for chunk in choice_chunks)
    texts, finished = {0: "", 1: ""}, {}
    for position, chunk in enumerate(choice_chunks):
        (choice,) = chunk["choices"]
        index, delta = choice["index"], choice["delta"]
        if position < 2:  # the role first, for each choice
            assert delta == {"role": "assistant", "content": ""} and choice["finish_reason"] is None
            continue
        assert index not in finished, "nothing after a choice's finish_reason"
        if choice["finish_reason"] is not None:
            assert delta == {}
            finished[index] = choice["finish_reason"]
        else:
            assert set(delta) == {"content"} and delta["content"]
            texts[index] += delta["content"]
    assert sorted(chunk["choices"][0]["index"] for chunk in choice_chunks[:2]) == [0, 1]
    assert set(finished) == {0, 1}

    whole = await chat(http, **request)  # the same seed, not streamed
    assert {c["index"]: c["message"]["content"] for c in whole["choices"]} == texts
    assert {c["index"]: c["finish_reason"] for c in whole["choices"]} == finished
    assert whole["usage"] == usage_chunk["usage"]


@on_module_loop
async def test_n_choices_share_the_request_and_max_completion_tokens_wins(http):
    body = await chat(http, n=3, temperature=1.0, seed=3, max_tokens=50, max_completion_tokens=3, ignore_eos=True)
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert all(choice["finish_reason"] == "length" for choice in body["choices"])
    assert body["usage"]["completion_tokens"] == 9
    assert len({choice["message"]["content"] for choice in body["choices"]}) > 1


@on_module_loop
async def test_a_stop_string_ends_the_choice_before_it(http):
    greedy = (await chat(http, max_tokens=8, temperature=0))["choices"][0]["message"]["content"]
    words = greedy.split()
    assert len(words) >= 2, greedy
    stop = words[1]
    stopped = (await chat(http, max_tokens=8, temperature=0, stop=[stop]))["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["message"]["content"] == greedy[: greedy.index(stop)]


@on_module_loop
async def test_a_conversation_longer_than_the_context_is_a_422_that_says_so(http):
    long = [{"role": "user", "content": "hello " * 9000}]
    error = await refused(http, messages=long)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "8192" in error["message"] and "context" in error["message"]
    no_limit = (await http.post("/v1/chat/completions", json={"messages": long})).json()["error"]
    assert no_limit["code"] == "context_length_exceeded" and "fills the model's context" in no_limit["message"]
    half = [{"role": "user", "content": "hello " * 4500}]  # fits, but not with 4096 tokens more
    too_much = await refused(http, messages=half, max_tokens=4096)
    assert too_much["code"] == "context_length_exceeded" and "4096 for the completion" in too_much["message"]


UNSUPPORTED = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "auto",
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "reasoning_effort": "low",
}


@on_module_loop
async def test_unsupported_fields_are_422s_that_name_them(http):
    for field, value in UNSUPPORTED.items():
        error = await refused(http, **{field: value})
        assert error["param"] == field and error["code"] == "unsupported_parameter", error
        assert error["message"].startswith(f"{field}: not supported by this server"), error
    tools = await refused(http, tools=UNSUPPORTED["tools"])
    assert "chat template has no place for tools" in tools["message"] and "Qwen2.5-Instruct" in tools["message"]
    typo = await refused(http, max_token=5)
    assert typo["param"] == "max_token" and "unknown field" in typo["message"]
    tool_turn = await refused(http, messages=[{"role": "tool", "content": "42", "tool_call_id": "x"}])
    assert tool_turn["param"] == "messages.0.role" and tool_turn["code"] == "unsupported_value"
    assert "'tool' is not supported" in tool_turn["message"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    picture = await refused(http, messages=image)
    assert picture["param"] == "messages.0.content" and "only text content parts" in picture["message"]
    for bad in ({"messages": []}, {"n": 17}, {"max_completion_tokens": 0}, {"temperature": 3}, {"stop": ["a"] * 5}):
        error = await refused(http, **bad)
        assert error["type"] == "invalid_request_error" and error["param"] == next(iter(bad)), error


@on_module_loop
async def test_fields_given_their_no_op_value_are_accepted(http):
    body = await chat(
        http, max_tokens=1, tools=[], tool_choice="none", functions=None, response_format={"type": "text"},
        logprobs=False, top_logprobs=0, logit_bias={}, presence_penalty=0, frequency_penalty=0.0, modalities=["text"],
        parallel_tool_calls=True, store=False, metadata={"k": "v"}, user="someone", service_tier="auto",
    )
    assert body["choices"][0]["finish_reason"] in ("length", "stop")


@on_module_loop
async def test_a_model_not_served_here_is_a_404_and_none_means_the_served_one(http):
    error = await refused(http, status=404, model="gpt-4o")
    assert error["code"] == "model_not_found" and error["param"] == "model" and MODEL in error["message"]
    assert (await chat(http, max_tokens=1))["model"] == MODEL


@on_module_loop
async def test_a_model_without_a_chat_template_answers_422_pointing_to_completions(http, tmp_path):
    """The bundled model's directory without its template (as many base models come): chat is
    refused with a message, completions still serve it."""
    source = Path((await http.get("/readyz")).json()["services"]["generation"]["engine"]["path"])
    plain = tmp_path / "plain-lm"
    plain.mkdir()
    for file in source.iterdir():
        if file.name == "chat_template.jinja":
            continue
        if file.suffix == ".safetensors":
            (plain / file.name).symlink_to(file)
        else:
            shutil.copy(file, plain / file.name)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    assert "chat_template" not in config  # the template lived in its own file only
    app = create_app(Settings.from_options(apps=["generation"], generation_model=str(plain), generation_threads=1))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=300) as other:
            await wait_ready(other, 300)
            reply = await other.post("/v1/chat/completions", json={"messages": CONVERSATION, "max_tokens": 1})
            assert reply.status_code == 422
            error = reply.json()["error"]
            assert "has no chat template" in error["message"] and "/v1/completions" in error["message"]
            completion = await other.post("/v1/completions", json={"prompt": RENDERED, "max_tokens": 1})
            assert completion.status_code == 200 and completion.json()["model"] == "plain-lm"


@on_module_loop
async def test_tokenize_on_the_torch_runtime_counts_as_chat_does(http):
    answer = await chat(http, max_tokens=1, temperature=0)
    counted = (await http.post("/tokenize", json={"content": RENDERED, "add_special": True})).json()["tokens"]
    assert len(counted) == answer["usage"]["prompt_tokens"]
    pieces = (await http.post("/tokenize", json={"content": RENDERED, "with_pieces": True, "model": MODEL})).json()["tokens"]
    assert "".join(piece["piece"] for piece in pieces) == RENDERED
    assert (await http.post("/detokenize", json={"tokens": counted})).json() == {"content": RENDERED}


@on_module_loop
async def test_logprobs_on_the_torch_runtime(http):
    body = await chat(http, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = body["choices"][0]["logprobs"]["content"]
    assert b"".join(bytes(item["bytes"]) for item in content).decode() == body["choices"][0]["message"]["content"]
    for item in content:  # greedy: each token is the likeliest
        assert item["top_logprobs"][0]["token"] == item["token"] and item["top_logprobs"][0]["logprob"] == item["logprob"]
    error = await refused(http, top_logprobs=2)
    assert error["param"] == "top_logprobs" and "needs logprobs: true" in error["message"]
    assert (await refused(http, logprobs=True, top_logprobs=21))["param"] == "top_logprobs"


@on_module_loop
async def test_json_schema_on_the_torch_runtime(http):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 20}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    body = await chat(http, n=2, temperature=0.8, seed=4, max_tokens=60, response_format=response_format)
    for choice in body["choices"]:
        value = json.loads(choice["message"]["content"])
        assert choice["finish_reason"] == "stop" and set(value) == {"answer", "sure"} and len(value["answer"]) <= 20
    assert (await chat(http, max_tokens=2, response_format={"type": "text"}))["choices"][0]["message"]["content"]
