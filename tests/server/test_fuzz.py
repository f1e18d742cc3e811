"""Fuzzing the server's app against its own OpenAPI spec, and hostile inputs by hand.

Whatever arrives, the app answers: never a 5xx for bad input, and every error body is
JSON with a message.  The app runs in process (conftest's ``in_process``: ``create_app``
behind an ASGI transport, with its middleware), one for the module; an exception escaping
the app fails the test as a 500 would.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio
import schemathesis
from hypothesis import HealthCheck, settings

from batchserve.server.app import create_app
from batchserve.settings import Settings
from tests.conftest import in_process

APPS = ["embeddings"]
MODELS = ["tests.fakes:echo"]
BATCH_DIR = tempfile.TemporaryDirectory(prefix="fuzz-batches-")  # the Batch API's files: not the user's cache
SETTINGS = Settings.from_options(apps=APPS, models=MODELS, max_body_bytes=200000, max_queue_size=100000, batch_dir=BATCH_DIR.name)
# The spec the app publishes (the same factory builds both; no model is loaded here).
schema = schemathesis.openapi.from_dict(create_app(SETTINGS).openapi())

on_module_loop = pytest.mark.asyncio(loop_scope="module")


@dataclass
class RunningApp:
    client: httpx.AsyncClient
    loop: asyncio.AbstractEventLoop  # the module's loop, which runs the app's services

    def send(self, case) -> httpx.Response:
        """Send a schemathesis case (from a synchronous hypothesis test) through the client."""
        request = case.as_transport_kwargs(base_url=str(self.client.base_url))
        headers = dict(request["headers"])
        if request.get("cookies"):
            headers["Cookie"] = "; ".join(f"{name}={value}" for name, value in request["cookies"].items())
        body = {"json": request["json"]} if "json" in request else {"content": request.get("data")}
        call = self.client.request(request["method"], request["url"], headers=headers, params=request["params"], **body)
        return self.loop.run_until_complete(asyncio.wait_for(call, 60))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzz_app():
    async with in_process(SETTINGS) as client:
        yield RunningApp(client, asyncio.get_running_loop())


@on_module_loop
async def test_published_spec_is_the_one_fuzzed(fuzz_app):
    assert (await fuzz_app.client.get("/openapi.json")).json()["paths"].keys() == schema.raw_schema["paths"].keys()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_json_error_bodies(case, fuzz_app):
    """No 5xx but one: a valid request whose own X-Request-Timeout (the spec allows 0.001 s
    and up, too short for a batch to run) passes while it is served gets the 504 it asked
    for.  (Below the bound, 5e-324 say, it is the client's mistake: a 422.)"""
    response = fuzz_app.send(case)
    asked_for_a_deadline = any(name.lower() == "x-request-timeout" for name in case.headers or {})
    if response.status_code == 504 and asked_for_a_deadline:
        error = response.json()["error"]  # /v1/* carries batchserve's kind in OpenAI's "code"
        assert "deadline" in (error["type"], error.get("code")), error
        return
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]


@on_module_loop
@pytest.mark.parametrize(
    "content, content_type",
    [
        (b'{"input": "hi"}', "text/plain"),
        (b"input=hi", "application/x-www-form-urlencoded"),
        (b"\xff\xfe\xfa not utf-8", "application/json"),
        (b'{"input": "\xff\xfe"}', "application/json"),
        (b"", "application/json"),
        (b"null", "application/json"),
        (b"[" * 5000 + b"]" * 5000, "application/json"),
        (b'{"input": ' + b"[" * 3000 + b"]" * 3000 + b"}", "application/json"),
    ],
)
async def test_hostile_bodies_get_4xx_json(fuzz_app, content, content_type):
    for path in ("/v1/embeddings", "/cluster", "/models/echo/predict"):
        response = await fuzz_app.client.post(path, content=content, headers={"content-type": content_type})
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:200])
        assert response.json()["error"]["message"]


@on_module_loop
async def test_input_list_limits_are_named(fuzz_app):
    too_many = await fuzz_app.client.post("/v1/embeddings", json={"input": ["a"] * 2049})
    assert too_many.status_code == 422 and "at most 2048 inputs" in too_many.json()["error"]["message"]
    too_many_sentences = await fuzz_app.client.post("/cluster", json={"sentences": ["a"] * 1025})
    assert too_many_sentences.status_code == 422 and "1024" in too_many_sentences.json()["error"]["message"]


@pytest.mark.parametrize("queue, limit", [(None, 1024), (100, 100)])
async def test_one_input_limit_in_every_message_and_the_schema(queue, limit):
    """/v1/embeddings states one limit: OpenAI's 2048 inputs, or fewer when the queue
    (--max-queue-size, 1024 by default) holds fewer, in the schema and in every 422.  (It
    said "at most 2048 inputs per request" to 5000 inputs, then "request has 2048 items; the
    limit is 1024" to 2048.)  The app is not started: these are refused before the batcher."""
    options = {} if queue is None else {"max_queue_size": queue}
    app = create_app(Settings.from_options(apps=["embeddings"], backend="thread", **options))
    spec = app.openapi()["components"]["schemas"]
    texts = spec["EmbeddingRequest"]["properties"]["input"]["anyOf"][1]
    assert texts["maxItems"] == limit and f"1 to {limit} texts" in spec["EmbeddingRequest"]["properties"]["input"]["description"]
    assert spec["ClusterRequest"]["properties"]["sentences"]["maxItems"] == min(limit, 1024)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        for count in (limit + 1, 2048, 5000):
            reply = await client.post("/v1/embeddings", json={"input": ["a"] * count})
            assert reply.status_code == 422, reply.text
            assert reply.json()["error"]["message"] == f"input: Value error, at most {limit} inputs per request (got {count})"
        reply = await client.post("/cluster", json={"sentences": ["a"] * 5000})
        assert reply.status_code == 422 and f"at most {min(limit, 1024)} items" in reply.json()["error"]["message"]


@on_module_loop
@pytest.mark.parametrize("path", ["/v1/embeddings", "/cluster", "/models/echo/predict"])
@pytest.mark.parametrize("value", ["5e-324", "0", "0.0009", "-1", "nan", "inf", "601", "soon"])
async def test_a_deadline_no_request_could_meet_is_a_422_naming_the_bound(fuzz_app, path, value):
    """X-Request-Timeout: 5e-324 was answered 504 ("deadline of 4.94066e-324 s exceeded"):
    the client's mistake, now a 422 that names the bounds the schema publishes."""
    body = {"sentences": ["a"]} if path == "/cluster" else {"input": "a"} if path.startswith("/v1") else {"inputs": [1]}
    reply = await fuzz_app.client.post(path, json=body, headers={"X-Request-Timeout": value})
    assert reply.status_code == 422, reply.text
    assert "X-Request-Timeout must be" in reply.json()["error"]["message"]
    assert "from 0.001 to 600 seconds" in reply.json()["error"]["message"]
    route = "/models/{name}/predict" if path.startswith("/models/") else path
    header = next(p for p in schema.raw_schema["paths"][route]["post"]["parameters"] if p["name"] == "x-request-timeout")
    assert header["schema"]["minimum"] == 0.001 and header["schema"]["maximum"] == 600
    assert "from 0.001 to 600 seconds" in header["description"]


async def test_a_deadline_that_passes_while_served_is_still_a_504():
    async with in_process(models=["tests.fakes:slow"], backend="thread") as client:
        shortest = await client.post("/models/slow/predict", json={"inputs": [1]}, headers={"X-Request-Timeout": "0.001"})
        assert shortest.status_code == 504 and shortest.json()["error"]["type"] == "deadline", shortest.text
        passed = await client.post("/models/slow/predict", json={"inputs": [1]}, headers={"X-Request-Timeout": "0.1"})
        assert passed.status_code == 504 and passed.json()["error"]["type"] == "deadline", passed.text


@on_module_loop
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
@pytest.mark.parametrize("path", ["/v1/embeddings", "/models/echo/predict"])
async def test_a_json_body_without_its_content_type_names_the_header(fuzz_app, content_type, path):
    """JSON sent as text/plain (curl -d without -H) was told "Input should be a valid
    dictionary": it is refused (FastAPI reads only JSON-typed bodies, so that a browser's
    form or text/plain post from another site reaches no route) with the header to send."""
    body = b'{"input": "hi"}' if path.startswith("/v1") else b'{"inputs": [1]}'
    headers = {} if content_type is None else {"content-type": content_type}
    reply = await fuzz_app.client.post(path, content=body, headers=headers)
    assert reply.status_code == 422, reply.text
    message = reply.json()["error"]["message"]
    assert "Content-Type: application/json" in message, message
    assert ("no Content-Type header" if content_type is None else f"had Content-Type: {content_type}") in message
    assert "dictionary" not in message


@on_module_loop
@pytest.mark.parametrize(
    "content, where",
    [
        (b'{"input": "hi",\n "user": }', "Expecting value at line 2, column 10 (char 25)"),
        (b'{"input": "hi"', "Expecting ',' delimiter at line 1, column 15 (char 14)"),
        (b"{'input': 'hi'}", "Expecting property name enclosed in double quotes at line 1, column 2 (char 1)"),
        (b'{"input": "hi"} trailing', "Extra data at line 1, column 17 (char 16)"),
    ],
)
async def test_invalid_json_says_where_and_what(fuzz_app, content, where):
    """Was "16: JSON decode error": now what is wrong and where, as Python's json says it."""
    for path in ("/v1/embeddings", "/cluster"):
        reply = await fuzz_app.client.post(path, content=content, headers={"content-type": "application/json"})
        assert reply.status_code == 422, reply.text
        assert reply.json()["error"]["message"] == f"the body is not valid JSON: {where}"


@on_module_loop
async def test_unknown_routes_and_methods_are_json(fuzz_app):
    missing = await fuzz_app.client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    wrong_method = await fuzz_app.client.get("/v1/embeddings")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]


GENERATION_APPS = ["generation", "infill"]
generation_schema = schemathesis.openapi.from_dict(
    create_app(Settings(apps=GENERATION_APPS)).openapi()
).include(path_regex="completions|autocomplete|infill")


#: each case's deadline (X-Request-Timeout): a boundary case asking for thousands of tokens ends
#: in this many seconds with its 504, so an endpoint's examples fit the test's time limit
FUZZ_DEADLINE_SECONDS = 20


@pytest.mark.slow  # minutes on a 2-core CPU: boundary cases ask for thousands of tokens
@pytest.mark.timeout(900)  # 10 examples and their shrinking, each up to FUZZ_DEADLINE_SECONDS
@generation_schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_generation_endpoints_have_no_server_errors(case, generation_server):
    """No 5xx but one: a valid request for more tokens than the CPU makes before the request's
    deadline gets the clear 504 the deadline promises.  (A real server: it is the generation
    server the generation tests share.)"""
    headers = {"X-Request-Timeout": str(FUZZ_DEADLINE_SECONDS)}
    response = case.call(base_url=generation_server.url, timeout=180, headers=headers)
    if response.status_code == 504:
        error = response.json()["error"]
        assert "deadline" in (error["type"], error.get("code")), error  # /v1/*: OpenAI's shape, the kind in code
        return
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
