"""The default app on the bundled all-MiniLM-L6-v2, in process (create_app behind an ASGI
transport: the server's routes, errors and body limit), one app for the module."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import pytest_asyncio

from batchserve.apps.embeddings import bundled_model_path, cluster
from tests.conftest import in_process

DOG_WALKING = [
    "Dog Walking: 10 Simple Steps",
    "The Secrets of Dog Walking",
    "Why You Need To Dog Walking",
    "The Art of Dog Walking",
    "The Joy of Dog Walking",
]
PUBLIC_SPEAKING = [
    "Public Speaking For The Modern Age",
    "Learn The Art of Public Speaking",
    "Master The Art of Public Speaking",
    "The Best Way To Public Speaking",
]


on_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embeddings_app():
    """One embeddings app (the default settings) shared by the module."""
    async with in_process(apps=["embeddings"]) as client:
        yield client


@pytest.fixture(scope="module")
def direct_model():
    """sentence-transformers itself, as a user would run the bundled model."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(bundled_model_path(), device="cpu", local_files_only=True)


@on_module_loop
async def test_http_embeddings_equal_direct_encode(embeddings_app, direct_model):
    texts = ["twinkle twinkle little star", "A much longer sentence about serving models in batches.", "x"]
    reply = await embeddings_app.post("/v1/embeddings", json={"input": texts, "model": "all-MiniLM-L6-v2"})
    assert reply.status_code == 200
    body = reply.json()
    assert body["object"] == "list" and body["model"] == "all-MiniLM-L6-v2"
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert all(item["object"] == "embedding" for item in body["data"])
    served = np.array([item["embedding"] for item in body["data"]])
    direct = direct_model.encode(texts, convert_to_numpy=True)
    assert served.shape == (3, 384)
    assert np.abs(served - direct).max() < 1e-5
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 3


@on_module_loop
async def test_single_string_and_base64(embeddings_app, direct_model):
    reply = (await embeddings_app.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"})).json()
    assert len(reply["data"]) == 1
    vector = np.frombuffer(base64.b64decode(reply["data"][0]["embedding"]), dtype="<f4")
    assert np.abs(vector - direct_model.encode(["hello"])[0]).max() < 1e-5


@on_module_loop
async def test_concurrent_requests_match_and_are_batched(embeddings_app, direct_model):
    texts = [f"sentence number {i} about batching" for i in range(40)]
    replies = await asyncio.gather(*(embeddings_app.post("/v1/embeddings", json={"input": t}) for t in texts))
    served = np.array([reply.json()["data"][0]["embedding"] for reply in replies])
    assert np.abs(served - direct_model.encode(texts)).max() < 1e-4  # batch padding differs slightly
    metrics = (await embeddings_app.get("/metrics")).text
    single = float(_metric(metrics, 'batchserve_batch_size_bucket{le="1",model="all-MiniLM-L6-v2"}'))
    total = float(_metric(metrics, 'batchserve_batch_size_count{model="all-MiniLM-L6-v2"}'))
    assert total > single, "some batch held more than one item"


@on_module_loop
async def test_cluster_finds_the_two_origin_story_groups(embeddings_app):
    reply = await embeddings_app.post("/cluster", json={"sentences": DOG_WALKING + PUBLIC_SPEAKING})
    assert reply.status_code == 200
    groups = sorted(sorted(group) for group in reply.json()["clusters"])
    assert groups == sorted([sorted(DOG_WALKING), sorted(PUBLIC_SPEAKING)])


def test_cluster_threshold_and_single_sentence():
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    assert cluster(vectors, 0.5) == [[0, 1], [2]]
    assert cluster(vectors, 0.999) == [[0], [1], [2]]
    assert cluster(vectors[:1], 0.5) == [[0]]


@on_module_loop
@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/embeddings", {"input": []}),
        ("/v1/embeddings", {"input": ""}),
        ("/v1/embeddings", {"input": [1, 2]}),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}),
        ("/v1/embeddings", {"inputs": "x"}),
        ("/cluster", {"sentences": []}),
        ("/cluster", {"sentences": ["a"], "threshold": 2}),
    ],
)
async def test_malformed_bodies_are_422(embeddings_app, path, body):
    reply = await embeddings_app.post(path, json=body)
    assert reply.status_code == 422
    assert reply.json()["error"]["message"]


@on_module_loop
async def test_wrong_dimensions_and_oversize(embeddings_app):
    reply = await embeddings_app.post("/v1/embeddings", json={"input": "x", "dimensions": 10})
    assert reply.status_code == 422 and "384" in reply.json()["error"]["message"]
    huge = {"input": "word " * 300_000}
    assert (await embeddings_app.post("/v1/embeddings", json=huge)).status_code == 413


def _metric(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name):
            return line.rsplit(" ", 1)[1]
    raise AssertionError(f"{name} not in metrics")


@on_module_loop
async def test_tokenize_gives_the_models_wordpieces_without_truncation(embeddings_app):
    text = "Batching unbelievable sentences"
    reply = (await embeddings_app.post("/tokenize", json={"content": text, "add_special": True, "with_pieces": True})).json()
    pieces = [token["piece"] for token in reply["tokens"]]
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and "batch" in pieces
    usage = (await embeddings_app.post("/v1/embeddings", json={"input": text})).json()["usage"]
    assert usage["prompt_tokens"] == len(pieces)
    long = (await embeddings_app.post("/tokenize", json={"content": "word " * 400})).json()["tokens"]
    assert len(long) == 400  # the model reads its first 256 tokens; /tokenize counts them all
    ids = [token["id"] for token in reply["tokens"]]
    detokenized = (await embeddings_app.post("/detokenize", json={"tokens": ids})).json()["content"]
    assert detokenized == "[CLS] batching unbelievable sentences [SEP]"


@on_module_loop
async def test_tokenize_refuses_a_lone_surrogate(embeddings_app):
    reply = await embeddings_app.post("/tokenize", content=b'{"content": "ab\\ud800"}', headers={"Content-Type": "application/json"})
    assert reply.status_code == 422 and "lone surrogate at character 2" in reply.json()["error"]["message"]
