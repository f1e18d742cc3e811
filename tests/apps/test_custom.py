"""Users' own models (``--model [name=]module:attr``) at ``/models/{name}/predict``, in process."""

from __future__ import annotations

import asyncio

import pytest

from batchserve.server.app import create_app
from batchserve.settings import Settings

MODELS = {
    "models": ["tests.fakes:double", "greeter=tests.fakes:Greeter", "tests.fakes:fragile", "tests.fakes:batch_sizes"],
    "max_batch_size": 8,
}


async def test_user_models_answer_independently(serve_app):
    client = await serve_app(**MODELS)
    assert (await client.post("/models/double/predict", json={"inputs": [1, 2.5]})).json() == {"outputs": [2, 5.0]}
    greeted = (await client.post("/models/greeter/predict", json={"inputs": ["ada"]})).json()
    assert greeted["outputs"][0]["text"] == "hello ada"
    assert (await client.get("/models")).json() == {"models": ["batch_sizes", "double", "fragile", "greeter"]}
    missing = await client.post("/models/nope/predict", json={"inputs": [1]})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


async def test_concurrent_http_callers_are_batched(serve_app):
    client = await serve_app(**MODELS)
    replies = await asyncio.gather(*(client.post("/models/batch_sizes/predict", json={"inputs": [i]}) for i in range(48)))
    sizes = [reply.json()["outputs"][0] for reply in replies]
    assert all(reply.status_code == 200 for reply in replies)
    assert max(sizes) > 1 and max(sizes) <= 8


async def test_model_error_is_500_with_message_and_no_traceback(serve_app):
    client = await serve_app(**MODELS)
    reply = await client.post("/models/fragile/predict", json={"inputs": ["boom"]})
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["type"] == "model" and "cannot handle boom" in error["message"]
    assert "Traceback" not in reply.text and "File " not in reply.text
    ok = await client.post("/models/fragile/predict", json={"inputs": ["fine"]})
    assert ok.json() == {"outputs": ["FINE"]}


@pytest.mark.parametrize(
    "models, message",
    [
        (["a=tests.fakes:double", "a=tests.fakes:echo"], "two models are named 'a'"),
        (["bad/name=tests.fakes:double"], "may hold only letters"),
        (["tests.fakes:missing"], "missing"),
        (["tests.nowhere:double"], "tests.nowhere"),
        (["tests.fakes"], "module:attribute"),
    ],
)
def test_bad_model_options_fail_when_the_app_is_built(models, message):
    with pytest.raises((ValueError, ImportError, AttributeError), match=message):
        create_app(Settings(models=models))
