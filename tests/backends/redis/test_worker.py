"""The Redis worker side (batchserve.backends.redis.worker, `batchserve worker`): entries are parsed without
pickle and refused clearly; a worker on SIGTERM answers what it holds; a wrong password
stops it with a clear error; two `--app embeddings` workers behind a front equal the model."""

from __future__ import annotations

import asyncio
import pickle
import time

import httpx
import numpy as np
import orjson
import pytest

from batchserve import wire
from batchserve.apps.embeddings import EmbeddingModel
from batchserve.backends.redis.connection import connect
from batchserve.backends.redis.protocol import GROUP, BadEntry, StreamKeys, ensure_group, parse_entry
from batchserve.backends.redis.worker import StreamWorker
from tests.fakes import double
from tests.redis_fixtures import (  # noqa: F401 - fixtures
    WorkerProcess,
    front_args,
    load,
    needs_redis,
    password_redis,
    redis_server,
    start_worker,
    wait_for_workers,
)

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


@needs_redis
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


# --------------------------------------------------------------------------- worker processes


@needs_redis
def test_sigterm_worker_answers_what_it_holds_and_leaves_the_rest(redis_server, start_worker, start_server):
    url = redis_server.url()
    # 5 s: long enough that a CI stall is not taken for a dead worker; an entry the leaving
    # worker left pending would still be reclaimed (and logged) before the load ends
    worker_args = ("--redis-url", url, "--model", "tests.redis_models:slow_double", "--visibility-timeout", "5")
    leaving = start_worker(*worker_args)
    staying = start_worker(*worker_args)
    wait_for_workers(redis_server.client(), "slow_double", 2, timeout=60)
    front = start_server(*front_args(url, "tests.redis_models:slow_double"))

    results = asyncio.run(
        load(f"{front.url}/models/slow_double/predict", 100, concurrency=30, when_answered={20: leaving.process.terminate})
    )
    assert leaving.process.wait(timeout=20) == 0, "a SIGTERM stops the worker cleanly"
    assert sorted(index for index, _, _ in results) == list(range(100))
    assert all((status, body) == (200, {"outputs": [index * 2]}) for index, status, body in results)
    assert "reclaimed" not in staying.stop(), "the leaving worker left nothing pending"


@needs_redis
async def test_an_entry_a_lost_read_left_pending_is_served_before_the_worker_leaves(redis_server, make_batcher):
    keys = StreamKeys("", "double")
    reply_key = keys.replies("front-1")
    client = connect(redis_server.url())
    try:
        await ensure_group(client, keys.requests)
        entry = {"id": "r1", "reply": reply_key, "deadline": time.time() + 60, "data": wire.dumps([3, 4])}
        await client.xadd(keys.requests, entry)
        # a read whose answer never reached the worker (a client-side timeout): Redis has
        # delivered the entry to the worker's consumer, the worker never saw it
        consumer = "worker-with-a-lost-read"
        await client.xreadgroup(GROUP, consumer, {keys.requests: ">"}, count=10)
        batcher = make_batcher(double, max_batch_size=8)
        await batcher.start()
        worker = StreamWorker(client, keys, batcher, consumer, visibility_timeout=60)
        worker.start()
        await worker.stop()

        replies = await client.xrange(reply_key)
        assert (await client.xpending(keys.requests, GROUP))["pending"] == 0, "nothing left for others to reclaim"
        assert [(fields[b"id"], wire.loads(fields[b"data"])) for _, fields in replies] == [(b"r1", [6, 8])]
    finally:
        await client.aclose()


@needs_redis
def test_wrong_password_stops_the_worker_with_a_clear_error(password_redis):
    worker = WorkerProcess("--redis-url", f"redis://:wrong@127.0.0.1:{password_redis.port}/0", "--model", "tests.fakes:double")
    try:
        worker.process.wait(timeout=60)
    finally:
        output = worker.stop()
    assert worker.process.returncode != 0
    assert "password" in output.lower()


# --------------------------------------------------------------------------- entries (no Redis needed)

KEYS = StreamKeys("blue", "double")
REPLY = KEYS.replies("front-1")


class Exploit:
    """Unpickling this would call print(): a stand-in for running any code."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def fields(**values) -> dict:
    entry = {b"id": b"r1", b"reply": REPLY.encode(), b"deadline": b"1e12", b"data": wire.dumps([1, 2])}
    entry.update({name.encode(): value for name, value in values.items()})
    return {name: value for name, value in entry.items() if value is not None}


def test_a_valid_entry_is_decoded():
    entry = parse_entry(b"1-0", fields(data=wire.dumps([np.arange(3), (1, "a")])), KEYS)
    assert (entry.entry_id, entry.request_id, entry.reply_key, entry.deadline) == (b"1-0", "r1", REPLY, 1e12)
    np.testing.assert_array_equal(entry.items[0], np.arange(3))
    assert entry.items[1] == (1, "a")


@pytest.mark.parametrize(
    "bad, answerable, says",
    [
        ({"data": pickle.dumps(Exploit())}, True, "malformed"),
        ({"data": None}, True, "'data'"),
        ({"deadline": None}, True, "'deadline'"),
        ({"deadline": b"soon"}, True, "malformed"),
        ({"deadline": b"nan"}, True, "finite"),
        ({"data": wire.dumps(5)}, True, "non-empty list"),
        ({"data": wire.dumps([])}, True, "non-empty list"),
        ({"reply": b"victim:key"}, False, "reply stream"),  # another model's or anybody's key
        ({"reply": KEYS.base.encode() + b":replies:"}, False, "reply stream"),
        ({"reply": StreamKeys("green", "double").replies("x").encode()}, False, "reply stream"),
        ({"id": None}, False, "no id"),
    ],
)
def test_bad_entries_are_refused_saying_why_and_answered_only_on_this_models_streams(bad, answerable, says, capsys):
    with pytest.raises(BadEntry, match=says) as refused:
        parse_entry(b"1-0", fields(**bad), KEYS)
    assert (refused.value.reply_key == REPLY) if answerable else (refused.value.reply_key is None)
    assert "unpickled" not in capsys.readouterr().out
