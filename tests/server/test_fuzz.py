"""Fuzzing the server against its own OpenAPI spec, and hostile inputs by hand.

Whatever arrives, the server answers: never a 5xx for bad input, and every error body is
JSON with a message.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import ServerProcess


from batchserve.server.app import create_app
from batchserve.settings import Settings

APPS = ["embeddings"]
MODELS = ["tests.fakes:echo"]
# The spec the served app publishes (the same factory builds both; no model is loaded here).
schema = schemathesis.openapi.from_dict(create_app(Settings(apps=APPS, models=MODELS)).openapi())


@pytest.fixture(scope="module")
def fuzz_server():
    args = [arg for app in APPS for arg in ("--app", app)] + [arg for model in MODELS for arg in ("--model", model)]
    server = ServerProcess(*args, "--max-body-bytes", "200000", "--max-queue-size", "100000")
    yield server
    server.stop()


def test_published_spec_is_the_one_fuzzed(fuzz_server):
    assert httpx.get(f"{fuzz_server.url}/openapi.json").json()["paths"].keys() == schema.raw_schema["paths"].keys()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_json_error_bodies(case, fuzz_server):
    response = case.call(base_url=fuzz_server.url, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]


def _post(server: ServerProcess, path: str, content: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=content, headers={"content-type": content_type}, timeout=60)


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
def test_hostile_bodies_get_4xx_json(fuzz_server, content, content_type):
    for path in ("/v1/embeddings", "/cluster", "/models/echo/predict"):
        response = _post(fuzz_server, path, content, content_type)
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:200])
        assert response.json()["error"]["message"]


def test_input_list_limits_are_named(fuzz_server):
    too_many = httpx.post(f"{fuzz_server.url}/v1/embeddings", json={"input": ["a"] * 2049}, timeout=60)
    assert too_many.status_code == 422 and "2048" in too_many.json()["error"]["message"]
    too_many_sentences = httpx.post(f"{fuzz_server.url}/cluster", json={"sentences": ["a"] * 1025}, timeout=60)
    assert too_many_sentences.status_code == 422 and "1024" in too_many_sentences.json()["error"]["message"]


def test_unknown_routes_and_methods_are_json(fuzz_server):
    missing = httpx.get(f"{fuzz_server.url}/nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    wrong_method = httpx.get(f"{fuzz_server.url}/v1/embeddings")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]


GENERATION_APPS = ["generation", "infill"]
generation_schema = schemathesis.openapi.from_dict(
    create_app(Settings(apps=GENERATION_APPS)).openapi()
).include(path_regex="completions|autocomplete|infill")


@pytest.mark.slow  # minutes on a 2-core CPU: boundary cases ask for thousands of tokens
@generation_schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_generation_endpoints_have_no_server_errors(case, generation_server):
    """No 5xx but one: a valid request for more tokens than the CPU makes before the request's
    deadline gets the clear 504 the deadline promises."""
    response = case.call(base_url=generation_server.url, timeout=180)
    if response.status_code == 504:
        assert response.json()["error"]["type"] == "deadline"
        return
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
