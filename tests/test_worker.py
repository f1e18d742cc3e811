"""Two `batchserve worker --app embeddings` processes behind a `serve --backend redis` front."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import orjson

from batchserve.apps.embeddings import EmbeddingModel
from tests.redis_fixtures import needs_redis, redis_server, start_worker, wait_for_workers  # noqa: F401

pytestmark = needs_redis

MODEL = "all-MiniLM-L6-v2"
REQUESTS = 40
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
        start_worker("--redis-url", url, "--app", "embeddings", "--max-latency", "0.02", "--visibility-timeout", "1.5")
    front = start_server("--backend", "redis", "--redis-url", url, "--app", "embeddings", "--drain-seconds", "0")
    client = redis_server.client()
    wait_for_workers(client, MODEL, 2, timeout=180)

    answers = asyncio.run(ask_all(front.url, REQUESTS))

    direct = EmbeddingModel()
    direct.load()
    expected = iter(direct.predict([text for index in range(REQUESTS) for text in texts_for(index)]))
    for index, answer in enumerate(answers):
        rows = [next(expected) for _ in texts_for(index)]
        vectors = np.array([row["embedding"] for row in sorted(answer["data"], key=lambda row: row["index"])])
        np.testing.assert_allclose(vectors, np.stack([vector for vector, _ in rows]), atol=1e-5)
        assert answer["usage"]["prompt_tokens"] == sum(tokens for _, tokens in rows)

    items = sum(len(texts_for(index)) for index in range(REQUESTS))
    sizes, busy_workers = worker_batch_sizes(client)
    deadline = time.monotonic() + 15
    while sum(size * count for size, count in sizes.items()) < items and time.monotonic() < deadline:
        time.sleep(0.3)  # workers publish their counters every third of the visibility timeout
        sizes, busy_workers = worker_batch_sizes(client)
    assert sum(size * count for size, count in sizes.items()) >= items, "every item computed"
    assert max(sizes) > 1, f"workers formed batches larger than 1 under concurrency: {sizes}"
    assert max(sizes) <= 64
    assert busy_workers == 2, "both workers took work"


def worker_batch_sizes(client) -> tuple[dict[int, int], int]:
    """Batch size → count, summed over the workers' published counters; workers that ran any."""
    sizes: dict[int, int] = {}
    busy = 0
    for key in client.scan_iter(match=f"batchserve::{MODEL}:workers:*"):
        stats = client.hgetall(key)
        busy += int(stats[b"batches"]) > 0
        for size, count in orjson.loads(stats[b"batch_sizes"]).items():
            sizes[int(size)] = sizes.get(int(size), 0) + count
    return sizes, busy
