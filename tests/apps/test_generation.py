"""The generation and infill apps over HTTP: a real `batchserve serve` on loopback, bundled SmolLM2."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

PROMPT = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def server(generation_server):
    return generation_server


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def complete(client: httpx.Client, **body) -> dict:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(client: httpx.Client, **body) -> list:
    events = []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def engine_state(client: httpx.Client) -> dict:
    return client.get("/readyz").json()["services"]["generation"]["engine"]


def test_completion_shape_and_usage(client):
    body = complete(client, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["text"].startswith(" Paris")
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def test_n_choices_differ_and_repeat_with_a_seed_and_stream_the_same(client):
    request = {"prompt": PROMPT, "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 42}
    first = complete(client, **request)
    second = complete(client, **request)
    texts = [choice["text"] for choice in first["choices"]]
    assert [choice["index"] for choice in first["choices"]] == [0, 1, 2]
    assert len(set(texts)) > 1, texts
    assert texts == [choice["text"] for choice in second["choices"]]
    assert 3 <= first["usage"]["completion_tokens"] <= 3 * 8

    events = stream_events(client, **request)
    assert events[-1] == "[DONE]"
    streamed = ["", "", ""]
    finish = {}
    for event in events[:-1]:
        (choice,) = event["choices"]
        streamed[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finish[choice["index"]] = choice["finish_reason"]
    assert streamed == texts
    assert finish == {i: c["finish_reason"] for i, c in enumerate(first["choices"])}


def test_stop_string_ends_the_choice_and_is_not_included(client):
    full = complete(client, prompt="The capital of France is", max_tokens=10, temperature=0)["choices"][0]["text"]
    stop = full.strip().split()[1]  # a word in the middle of the greedy output
    cut = complete(client, prompt="The capital of France is", max_tokens=10, temperature=0, stop=[stop, "zzz"])
    (choice,) = cut["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full[: full.index(stop)]
    assert stop not in choice["text"]


def test_list_of_prompts_and_streamed_usage(client):
    body = complete(client, prompt=["Hello, my name is", "The sky is"], n=2, max_tokens=3, temperature=0)
    assert sorted(choice["index"] for choice in body["choices"]) == [0, 1, 2, 3]
    events = stream_events(client, prompt="The sky is", max_tokens=3, temperature=0, stream_options={"include_usage": True})
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3


def test_invalid_requests_get_422(client):
    assert client.post("/v1/completions", json={"prompt": "", "max_tokens": 2}).status_code == 422
    assert client.post("/v1/completions", json={"prompt": "hi", "n": 100}).status_code == 422
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 9000}).status_code == 422
    assert client.post("/autocomplete", json={"context": ""}).status_code == 422
    response = client.post("/infill", json={"text": "no mask here"})
    assert response.status_code == 422 and "[MASK]" in response.json()["error"]["message"]


def test_client_disconnecting_mid_stream_frees_its_rows(server, client):
    body = {"prompt": "Count from one to a thousand: one, two,", "n": 2, "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=120) as leaving:
        with leaving.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # the generation is running: now hang up
            assert engine_state(client)["active_rows"] == 2
    deadline = time.monotonic() + 60
    while engine_state(client)["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine_state(client)["active_rows"] == 0
    assert complete(client, prompt="Hi", max_tokens=2, temperature=0)["choices"][0]["finish_reason"]


def test_client_giving_up_on_a_plain_request_frees_its_rows(server, client):
    body = {"prompt": "Count from one to a thousand: one, two,", "n": 3, "max_tokens": 300, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=8) as impatient, ThreadPoolExecutor(1) as pool:
        gives_up = pool.submit(impatient.post, "/v1/completions", json=body)
        seen = 0
        while not gives_up.done():
            seen = max(seen, engine_state(client)["active_rows"])
            time.sleep(0.1)
        with pytest.raises(httpx.ReadTimeout):
            gives_up.result()
    assert seen == 3  # its three rows were decoding while the client waited
    deadline = time.monotonic() + 60
    while engine_state(client)["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine_state(client)["active_rows"] == 0


def test_openai_client(server):
    from openai import OpenAI

    openai = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
    completion = openai.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert completion.choices[0].text.startswith(" Paris")
    assert completion.usage.completion_tokens == 4

    several = openai.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, n=3, max_tokens=4, seed=3)
    assert sorted(choice.index for choice in several.choices) == [0, 1, 2]

    prompt = "The capital of France is"
    stream = openai.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=4, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(chunk.choices[0].text for chunk in chunks) == completion.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_autocomplete_gives_n_suggestions(client):
    response = client.post("/autocomplete", json={"context": "I went to the market to buy", "n": 3, "max_tokens": 5, "seed": 1})
    assert response.status_code == 200, response.text
    suggestions = response.json()["suggestions"]
    assert len(suggestions) == 3 and all(isinstance(s, str) and s for s in suggestions)


TUTORIAL = {  # the service-streamer tutorial's sentences, and their answers
    "twinkle twinkle [MASK] star.": "little",
    "the answer to life, the [MASK], and everything.": "universe",
    "Happy birthday to [MASK].": "you",
}


def test_infill_fills_the_mask(client):
    response = client.post("/infill", json={"text": "twinkle twinkle [MASK] star."})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == "twinkle twinkle little star."
    assert body["fills"][0]["fill"] == "little"
    assert body["fills"][0]["candidates"][0]["fill"] == "little"


@pytest.mark.parametrize("text", list(TUTORIAL)[1:])
def test_infill_gives_the_tutorials_answers(client, text):
    response = client.post("/infill", json={"text": text})
    assert response.status_code == 200, response.text
    assert response.json()["fills"][0]["fill"] == TUTORIAL[text]


def test_concurrent_infill_requests_each_get_the_answer_alone(client):
    """Scored together (shared calls, a text two requests share scored once) and, with a seed,
    proposed once for requests alike: each still gets its own text's answer; one without a
    seed, and one with two masks, among them."""
    bodies = [{"text": text} for text in TUTORIAL for _ in range(2)]
    bodies += [{"text": "Happy birthday to [MASK].", "seed": None}, {"text": "twinkle twinkle [MASK] star. Happy birthday to [MASK]."}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: client.post("/infill", json=body), bodies))
    assert all(reply.status_code == 200 for reply in replies), [reply.text for reply in replies]
    for body, reply in zip(bodies[:7], replies):
        assert reply.json()["fills"][0]["fill"] == TUTORIAL[body["text"]]
    assert replies[-1].json()["text"] == "twinkle twinkle little star. Happy birthday to you."


def test_metrics_count_generated_tokens(client):
    complete(client, prompt="Hello", max_tokens=2, temperature=0)
    metrics = client.get("/metrics").text
    tokens = [line for line in metrics.splitlines() if line.startswith("batchserve_generation_tokens_total ")]
    assert tokens and float(tokens[0].split()[1]) >= 2
    assert "batchserve_generation_active_rows" in metrics


def test_editor_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<textarea id="editor"' in page.text
    assert client.get("/editor/editor.js").status_code == 200
    assert client.get("/editor/nothing.js").status_code == 404


def test_infill_answers_504_at_its_deadline(generation_server):
    """One deadline covers every mask and every scoring step of an infill request."""
    import time as clock

    text = " ".join(f"word{i} [MASK]" for i in range(4)) + " end."
    started = clock.monotonic()
    reply = httpx.post(f"{generation_server.url}/infill", json={"text": text}, headers={"X-Request-Timeout": "0.3"},
                       timeout=60)
    assert reply.status_code == 504 and reply.json()["error"]["type"] == "deadline"
    assert clock.monotonic() - started < 3.0


def test_readyz_and_metrics_show_the_runtime_and_its_prefix_cache(client):
    """auto: llama.cpp on this CPU when llama-cpp-python loads (else torch); a prompt that
    begins with an earlier one's tokens is a prefix-cache hit, counted in /metrics."""
    import importlib.util

    engine = engine_state(client)
    if importlib.util.find_spec("llama_cpp") is None:
        assert engine["runtime"] == "torch" and "prefix_cache" not in engine
        return
    assert engine["runtime"] == "llama.cpp" and engine["precision"] == "Q4_1"
    assert engine["prefix_cache"]["budget_tokens"] == 4096

    def counter(name: str) -> float:
        lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(f"{name} ")]
        return float(lines[0].split()[1])

    hits = counter("batchserve_generation_prefix_cache_hits_total")
    reused = counter("batchserve_generation_prefix_cache_reused_tokens_total")
    text = "The lighthouse keeper climbed the hundred and twelve steps to the lamp room every evening."
    complete(client, prompt=text, max_tokens=2, temperature=0)
    complete(client, prompt=text + " One night", max_tokens=2, temperature=0)
    assert counter("batchserve_generation_prefix_cache_hits_total") >= hits + 1
    assert counter("batchserve_generation_prefix_cache_reused_tokens_total") >= reused + 15
    assert engine_state(client)["prefix_cache"]["tokens"] <= 4096


TOKENIZE_TEXT = "Héllo wörld 😀 <|im_end|> over\nthe lazy dog"


def test_tokenize_counts_as_the_completions_route_and_detokenize_inverts_it(client):
    tokens = client.post("/tokenize", json={"content": PROMPT, "add_special": True}).json()["tokens"]
    assert all(isinstance(token, int) for token in tokens)
    assert complete(client, prompt=PROMPT, max_tokens=1, temperature=0)["usage"]["prompt_tokens"] == len(tokens)
    plain = client.post("/tokenize", json={"content": TOKENIZE_TEXT}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": plain}).json() == {"content": TOKENIZE_TEXT}
    pieces = client.post("/tokenize", json={"content": TOKENIZE_TEXT, "with_pieces": True}).json()["tokens"]
    assert [piece["id"] for piece in pieces] == plain
    assert "<|im_end|>" in [piece["piece"] for piece in pieces]  # a special token in the text is that token
    # the emoji's four bytes span two tokens: their pieces are lists of bytes, as llama.cpp writes them
    joined = b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode() for p in pieces)
    assert joined.decode() == TOKENIZE_TEXT
    assert any(isinstance(piece["piece"], list) for piece in pieces)
    assert client.post("/tokenize", json={"content": ""}).json() == {"tokens": []}


def test_tokenize_and_detokenize_refuse_bad_bodies(client):
    def refused(path: str, body, status: int = 422) -> str:
        reply = client.post(path, json=body)
        assert reply.status_code == status, reply.text
        return reply.json()["error"]["message"]

    assert "content" in refused("/tokenize", {})
    assert "add_specials" in refused("/tokenize", {"content": "a", "add_specials": True})  # a typo is not dropped
    assert "content" in refused("/tokenize", {"content": 5})
    assert "tokens[1]: 99999999 is not a token id" in refused("/detokenize", {"tokens": [1, 99999999]})
    assert "tokens[0]: -1 is not a token id" in refused("/detokenize", {"tokens": [-1]})
    assert "tokens" in refused("/detokenize", {"tokens": ["a"]})
    assert "'gpt-4' is not served here" in refused("/tokenize", {"content": "a", "model": "gpt-4"}, 404)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", '{"prompt": "Hello \\ud800", "max_tokens": 2}'),
        ("/v1/completions", '{"prompt": ["fine", "\\udfff"], "max_tokens": 2}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi \\ud800"}], "max_tokens": 2}'),
        ("/autocomplete", '{"context": "\\ud800 went", "n": 1, "max_tokens": 2}'),
        ("/infill", '{"text": "a \\ud800 [MASK] day"}'),
    ],
)
def test_a_lone_surrogate_is_a_422_not_a_server_error(client, path, body):
    """JSON can carry "\\ud800" (Python's json decodes it); no tokenizer can read it."""
    reply = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert "valid string" in reply.json()["error"]["message"], reply.text


def test_every_generation_route_refuses_unknown_fields(client):
    def refused(path: str, body: dict, field: str) -> None:
        reply = client.post(path, json=body)
        assert reply.status_code == 422, (path, body, reply.text)
        assert field in reply.json()["error"]["message"], reply.text

    refused("/v1/completions", {"prompt": "Hello", "max_token": 5}, "max_token")
    refused("/v1/completions", {"prompt": "Hello", "temprature": 0.5}, "temprature")
    refused("/v1/completions", {"prompt": "Hello", "best_of": 3}, "best_of")
    refused("/v1/completions", {"prompt": "Hello", "suffix": "world"}, "suffix")
    refused("/v1/completions", {"prompt": "Hello", "stream_options": {"include_usag": True}}, "include_usag")
    refused("/v1/completions", {"prompt": "Hello", "logit_bias": {"a": 1}}, "token ids")
    refused("/v1/completions", {"prompt": "Hello", "logit_bias": {"99999999": 1}}, "99999999 is not a token id")
    refused("/v1/completions", {"prompt": "Hello", "presence_penalty": 3}, "presence_penalty")
    refused("/autocomplete", {"context": "Hello", "max_token": 5}, "max_token")
    refused("/infill", {"text": "a [MASK] day", "candidate": 3}, "candidate")
    # the no-op values of what is not implemented pass
    assert complete(client, prompt="Hello", max_tokens=1, best_of=1, suffix="", temperature=0)["choices"]


def test_logit_bias_and_penalties_change_the_greedy_answer(client):
    asked = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    free = client.post("/tokenize", json={"content": complete(client, **asked)["choices"][0]["text"]}).json()["tokens"]
    banned = complete(client, **asked, logit_bias={str(free[0]): -100})["choices"][0]["text"]
    assert client.post("/tokenize", json={"content": banned}).json()["tokens"][0] != free[0]
    forced = complete(client, **asked, logit_bias={"28": 100})["choices"][0]["text"]  # 28: ","
    assert forced == ",,,,", forced
    count = {"prompt": "Count: 1, 2, 3, 4, 5,", "max_tokens": 12, "temperature": 0}
    plain = complete(client, **count)["choices"][0]["text"]
    assert plain.count(",") >= 4, plain  # the model goes on: 6, 7, 8...
    penalized = complete(client, **count, frequency_penalty=2.0, presence_penalty=2.0)["choices"][0]["text"]
    assert penalized.count(",") < plain.count(","), (plain, penalized)  # ...unless its commas are penalized
