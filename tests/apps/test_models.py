"""GET /v1/models, the model check of /v1/embeddings, and the error shapes of /v1/* and of the
other routes, in process (embeddings + a user model; no LLM), with the official openai client
on the app's ASGI transport.  One app for the module."""

from __future__ import annotations

import time

import httpx
import httpx2
import openai
import pytest
import pytest_asyncio

from batchserve.server.app import create_app
from batchserve.settings import Settings
from tests.conftest import wait_ready

SERVED = ["all-MiniLM-L6-v2", "double"]
on_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app():
    settings = Settings.from_options(apps=["embeddings"], models=["tests.fakes:double"], max_body_bytes=20_000)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            await wait_ready(client, 120)
        yield app


@pytest_asyncio.fixture(loop_scope="module")
async def http(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def client(app):
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://test") as http_client:
        yield openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http_client, max_retries=0)


@on_module_loop
async def test_models_list_every_served_model_in_openai_shape(http):
    body = (await http.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == SERVED
    for card in body["data"]:
        assert card["object"] == "model" and card["owned_by"] == "batchserve"
        assert isinstance(card["created"], int) and card["created"] > 1_600_000_000
    one = (await http.get("/v1/models/double")).json()
    assert one == body["data"][1]


@on_module_loop
async def test_openai_client_lists_and_retrieves_models(client):
    page = await client.models.list()
    assert [model.id for model in page.data] == SERVED
    model = await client.models.retrieve("all-MiniLM-L6-v2")
    assert model.id == "all-MiniLM-L6-v2" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("gpt-4o")
    assert missing.value.status_code == 404
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    assert missing.value.type == "invalid_request_error"
    assert "'gpt-4o'" in missing.value.message and "all-MiniLM-L6-v2, double" in missing.value.message


@on_module_loop
async def test_embeddings_serve_their_model_named_or_not_and_refuse_others(client, http):
    unnamed = (await http.post("/v1/embeddings", json={"input": "hello"})).json()
    assert unnamed["model"] == "all-MiniLM-L6-v2"
    named = await client.embeddings.create(model="all-MiniLM-L6-v2", input=["hello", "world"])
    assert named.model == "all-MiniLM-L6-v2" and len(named.data) == 2
    for other in ("double", "text-embedding-3-small"):  # served elsewhere, or not at all
        with pytest.raises(openai.NotFoundError) as refused:
            await client.embeddings.create(model=other, input="hello")
        error = refused.value.body
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert f"'{other}'" in error["message"] and "/v1/embeddings" in error["message"]
        assert "'all-MiniLM-L6-v2'" in error["message"]


@on_module_loop
async def test_v1_errors_are_openai_shaped_and_typed(client, http):
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        await client.embeddings.create(model="all-MiniLM-L6-v2", input=[])
    assert invalid.value.status_code == 422
    error = invalid.value.body
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request" and error["param"] == "input"
    assert "input must not be empty" in error["message"]

    wrong_dimensions = (await http.post("/v1/embeddings", json={"input": "a", "dimensions": 512})).json()["error"]
    assert wrong_dimensions["param"] == "dimensions" and "384" in wrong_dimensions["message"]

    not_json = await http.post("/v1/embeddings", content=b"\xff{", headers={"content-type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["error"]["type"] == "invalid_request_error"

    too_large = await http.post("/v1/embeddings", json={"input": ["x" * 100] * 300})
    assert too_large.status_code == 413
    assert too_large.json()["error"] == {
        "message": "request body larger than 20000 bytes", "type": "invalid_request_error", "param": None, "code": "too_large",
    }
    unknown = await http.get("/v1/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


@on_module_loop
async def test_other_routes_keep_batchserve_error_bodies(http):
    invalid = (await http.post("/models/double/predict", json={"inputs": []})).json()["error"]
    assert invalid["type"] == "invalid_request" and "code" not in invalid and "param" not in invalid
    missing = (await http.post("/models/nope/predict", json={"inputs": [1]})).json()["error"]
    assert missing["type"] == "not_found" and "nope" in missing["message"]
    too_large = await http.post("/models/double/predict", json={"inputs": ["x" * 100] * 300})
    assert too_large.json() == {"error": {"message": "request body larger than 20000 bytes", "type": "too_large"}}
    bad_body = await http.post("/cluster", content=b"\xff{", headers={"content-type": "application/json"})
    assert bad_body.status_code == 422 and bad_body.json()["error"]["type"] == "invalid_request"


async def test_not_ready_is_a_503_the_client_retries_after_retry_after():
    """A generation app whose model has not loaded: 503 not_ready with Retry-After.  The openai
    client waits Retry-After and retries it (as it would a 429), then raises InternalServerError."""
    # no lifespan: nothing loads (settings no other test uses: a host of its own, never started)
    app = create_app(Settings.from_options(apps=["generation"], generation_max_rows=7))
    paths = []

    async def counting(scope, receive, send):
        if scope["type"] == "http":
            paths.append(scope["path"])
        await app(scope, receive, send)

    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=counting), base_url="http://test") as http_client:
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http_client, max_retries=1)
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as busy:
            await client.completions.create(model="SmolLM2-135M-Instruct", prompt="hello", max_tokens=1)
        waited = time.monotonic() - started
    assert paths == ["/v1/completions", "/v1/completions"] and waited >= 1.0  # Retry-After: 1
    assert busy.value.status_code == 503 and int(busy.value.response.headers["Retry-After"]) >= 1
    assert busy.value.body["code"] == "not_ready" and busy.value.body["type"] == "server_error"
