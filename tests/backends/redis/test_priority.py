"""Online before offline on the Redis fleet: a batch of offline work (batchserve.priority.offline, a
batch job's) goes to the model's offline stream, which workers read only when the request stream has
nothing; leases, reclaim, acks and the backlog cover both streams.  A real redis-server; the model is a
fake whose cost is known (the test is about timing)."""

from __future__ import annotations

import asyncio
import time

from batchserve import Batcher, wire
from batchserve.backends.redis.connection import connect
from batchserve.backends.redis.front import RedisBackend
from batchserve.backends.redis.protocol import GROUP, StreamKeys, ensure_group
from batchserve.backends.redis.worker import StreamWorker, serve_batchers
from batchserve.priority import offline
from batchserve.server.metrics import BacklogSampler
from tests.fakes import RecordingModel, double
from tests.redis_fixtures import needs_redis, redis_server  # noqa: F401 - fixtures


async def wait_for(condition, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.02)


@needs_redis
async def test_an_online_batch_overtakes_a_jobs_backlog_on_the_worker_fleet(redis_server, make_batcher):
    url = redis_server.url()
    keys = StreamKeys("", "slow")
    model = RecordingModel(cost=0.1)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve_batchers({"slow": Batcher(model, max_batch_size=4)}, url, stop=stop))
    client = connect(url)
    try:
        await wait_for(lambda: client.zcount(keys.workers, time.time(), "+inf"))
        front = make_batcher(RedisBackend(url, "slow"), max_batch_size=4)
        await front.start()
        with offline():
            backlog = [asyncio.ensure_future(front.submit([i])) for i in range(40)]  # 10 worker batches: 1 s
        await asyncio.sleep(0.25)
        assert await client.xlen(keys.requests) == 0 and await client.xlen(keys.offline_requests) > 0
        seen = await front.backend.backlog()
        assert seen.entries == seen.offline_entries > 0 and seen.pending == seen.offline_pending and seen.workers == 1
        sampler = BacklogSampler(lambda: [front])  # /metrics: the offline share has gauges of its own
        await sampler.refresh()
        gauges = {family.name: family.samples[0].value for family in sampler.collect()}
        assert gauges["batchserve_stream_offline_entries"] == gauges["batchserve_stream_entries"] > 0
        assert gauges["batchserve_stream_offline_pending"] == gauges["batchserve_stream_pending"]

        started = time.perf_counter()
        assert await front.submit([1000]) == [2000]
        waited = time.perf_counter() - started
        assert [r[0] for r in await asyncio.gather(*backlog)] == [2 * i for i in range(40)]
        position = model.seen.index(1000)
        assert len(model.seen) - position > 8, f"the online batch waited behind the backlog: {model.batches}"
        assert waited < 0.6, f"the online batch waited {waited:.2f} s"
        for stream in (keys.requests, keys.offline_requests):  # answered, acked and deleted on both
            assert await client.xlen(stream) == 0
            assert (await client.xpending(stream, GROUP))["pending"] == 0
    finally:
        stop.set()
        await serving
        await client.aclose()


@needs_redis
async def test_an_offline_entry_a_dead_worker_held_is_reclaimed_and_answered(redis_server, make_batcher):
    keys = StreamKeys("", "double")
    reply_key = keys.replies("front-1")
    client = connect(redis_server.url())
    try:
        for stream in (keys.requests, keys.offline_requests):
            await ensure_group(client, stream)
        entry = {"id": "r1", "reply": reply_key, "deadline": time.time() + 60, "data": wire.dumps([3, 4])}
        await client.xadd(keys.offline_requests, entry)
        await client.xreadgroup(GROUP, "a-worker-that-died", {keys.offline_requests: ">"}, count=10)
        batcher = make_batcher(double, max_batch_size=8)
        await batcher.start()
        first = StreamWorker(client, keys, batcher, "alive", visibility_timeout=0.6)
        second = StreamWorker(client, keys, batcher, "alive", visibility_timeout=0.6, offline=True, primary=first)
        second.start()
        first.start()
        await wait_for(lambda: client.xlen(reply_key))
        await first.stop()  # stops both

        (_, fields), = await client.xrange(reply_key)
        assert (fields[b"id"], wire.loads(fields[b"data"])) == (b"r1", [6, 8])
        assert await client.xlen(keys.offline_requests) == 0
        assert (await client.xpending(keys.offline_requests, GROUP))["pending"] == 0
        assert await client.zcount(keys.workers, time.time(), "+inf") == 0, "the lease left with the worker"
    finally:
        await client.aclose()
