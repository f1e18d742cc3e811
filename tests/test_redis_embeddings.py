"""Two `batchserve worker --app embeddings` processes behind a `serve --backend redis` front."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson

from batchserve.apps.embeddings import EmbeddingModel
from tests.redis_fixtures import needs_redis, redis_server, start_worker, wait_for_workers  # noqa: F401

pytestmark = needs_redis

MODEL = "all-MiniLM-L6-v2"
TOPICS = ["dog walking", "public speaking", "baking bread", "mountain biking", "tax returns", "jazz piano"]


def texts_for(index: int) -> list[str]:
    """1 to 3 different texts per request."""
    return [f"request {index}: the joy of {TOPICS[(index + k) % len(TOPICS)]}" for k in range(1 + index % 3)]


async def ask_all(url: str, count: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(index: int) -> dict:
            response = await client.post(f"{url}/v1/embeddings", json={"input": texts_for(index)})
            assert response.status_code == 200, response.text
            return response.json()

        return await asyncio.gather(*(one(index) for index in range(count)))


def test_two_workers_and_a_front_equal_the_direct_model(redis_server, start_worker, start_server):
    url = redis_server.url()
    for _ in range(2):
        start_worker("--redis-url", url, "--app", "embeddings", "--max-latency", "0.02")
    front = start_server("--backend", "redis", "--redis-url", url, "--app", "embeddings")
    client = redis_server.client()
    wait_for_workers(client, MODEL, 2, timeout=180)

    answers = asyncio.run(ask_all(front.url, 48))

    direct = EmbeddingModel()
    direct.load()
    for index, answer in enumerate(answers):
        expected = direct.predict(texts_for(index))
        vectors = np.array([row["embedding"] for row in sorted(answer["data"], key=lambda row: row["index"])])
        np.testing.assert_allclose(vectors, np.stack([vector for vector, _ in expected]), atol=1e-5)
        assert answer["usage"]["prompt_tokens"] == sum(tokens for _, tokens in expected)

    sizes: dict[int, int] = {}
    workers_seen = 0
    for key in client.scan_iter(match=f"batchserve::{MODEL}:workers:*"):
        stats = client.hgetall(key)
        if int(stats[b"batches"]):
            workers_seen += 1
        for size, count in orjson.loads(stats[b"batch_sizes"]).items():
            sizes[int(size)] = sizes.get(int(size), 0) + count
    assert sum(size * count for size, count in sizes.items()) >= sum(len(texts_for(i)) for i in range(48))
    assert max(sizes) > 1, f"workers formed batches larger than 1 under concurrency: {sizes}"
    assert max(sizes) <= 64
    assert workers_seen == 2, "both workers took work"
