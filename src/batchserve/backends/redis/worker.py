"""The Redis workers: serve request streams with local batchers (``batchserve worker``).

The front side (``serve --backend redis``) is :mod:`.front`, the keys and entries both read
are :mod:`.protocol`'s; the reclaim protocol is described in docs/ARCHITECTURE.md ("The
Redis protocol").  The worker serves the models it is given (name → :class:`ModelSpec`, from
:func:`batchserve.apps.batched_models` via ``batchserve worker``): it builds their batchers
as ``serve`` does, and no HTTP service.

For each model a :class:`StreamWorker` reads entries with the consumer group while its
local :class:`~batchserve.batching.Batcher` has a free slot, so the batcher forms batches of
up to ``max_batch_size`` items from whatever waits on the stream (with its usual
idle-aware wait, at most ``max_latency``), and a busy worker leaves entries to the others.

An entry's life (see :mod:`.protocol` for the keys and fields):

1. read (``XREADGROUP``), or reclaimed (``XPENDING`` + ``XCLAIM``) from another consumer
   idle longer than the visibility timeout: a worker that died.  A worker refreshes the entries it holds
   (``XCLAIM`` JUSTID) every third of the timeout, so a long batch is never stolen.
2. decoded (:mod:`batchserve.wire`, never pickle).  A malformed entry is answered with an
   error when it names a reply stream of this model, and acked either way.
3. computed by the batcher; an entry past its deadline is not computed but answered with
   a deadline error.  An entry reclaimed from dead workers twice is answered with a
   worker-died error instead of killing a third worker.
4. answered on the front's reply stream, then acked and deleted (``XACK``, ``XDEL``) in
   one pipeline, so the request stream holds only unfinished work.

Each model has a second stream, for offline batches (a batch job's, see
:func:`batchserve.priority.offline`), served by a second :class:`StreamWorker` on the same
batcher (``offline=True``, its ``primary`` the first).  The first one's loop reads for both:
the request stream first, the offline stream only when the request stream has nothing, and
when neither has, it blocks on both.  What the offline stream gives is submitted as offline
work, so online entries read later still go first in the local batcher.  Refreshes, reclaims,
acks and deletes are each stream's own; the worker's lease (``<base>:workers``) is the first
one's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Mapping

import orjson
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError

from batchserve import priority
from batchserve.aio import wait_event
from batchserve.backends.redis.connection import WORKER_COMMANDS, TLSFiles, check_commands, connect, diagnose
from batchserve.backends.redis.protocol import (
    GROUP,
    READ_BLOCK_MS,
    RECONNECT_DELAY,
    UNREACHABLE,
    BadEntry,
    Entry,
    StreamKeys,
    ensure_group,
    error_reply,
    parse_entry,
    redact,
    result_reply,
)
from batchserve.batching import Batcher
from batchserve.errors import DeadlineExceededError, InputError, WorkerDiedError
from batchserve.logs import configure_logging
from batchserve.model import ModelSpec
from batchserve.settings import Settings

log = logging.getLogger("batchserve.worker")

#: an entry delivered this many times was reclaimed from two dead workers: fail it
MAX_DELIVERIES = 3
#: a reply stream outlives its last reply by this long (a front that died leaves nothing)
REPLY_TTL_SECONDS = 300
REPLY_STREAM_LENGTH = 10_000
#: a consumer with nothing pending and idle this many visibility timeouts is removed
STALE_CONSUMER_TIMEOUTS = 10
#: on SIGTERM: seconds a worker gives what it holds to finish (then it is left to be reclaimed)
HELD_GRACE = 10.0
#: on SIGTERM: seconds each of its loops (reading, upkeep, replies) gets to end by itself
LOOP_GRACE = 5.0


@dataclass
class Reply:
    entry_id: bytes
    reply_key: str | None  # None: nobody to answer, just ack
    fields: dict
    deadline: float


class StreamWorker:
    """Serves one model's request stream with one local batcher.

    ``offline=True``: its offline stream instead, with ``primary`` the worker of the request
    stream on the same batcher: ``primary``'s loop reads the offline stream only when the
    request stream has nothing, ``primary.stop()`` stops both, and the lease is ``primary``'s.
    Entries of the offline stream are submitted as offline work."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: StreamKeys,
        batcher: Batcher,
        consumer: str,
        visibility_timeout: float = 10.0,
        offline: bool = False,
        primary: StreamWorker | None = None,
    ):
        self.redis = client
        self.keys = keys
        self.batcher = batcher
        self.consumer = consumer
        self.visibility_timeout = visibility_timeout
        self.offline = offline
        self.primary = primary
        self.secondary: StreamWorker | None = None  # the offline stream's worker, read by this one's loop
        if primary is not None:
            primary.secondary = self
        self.stream = keys.stream(offline)
        self._held: dict[bytes, asyncio.Task] = {}
        self._unacked: set[bytes] = set()  # answered, not yet acked
        self._outbox: list[Reply] = []
        self._outbox_ready = asyncio.Event()
        self._room = primary._room if primary is not None else asyncio.Event()  # one reading loop for both
        self._upkeep_now = asyncio.Event()  # set: renew the lease now (Redis came back)
        self._reader: asyncio.Task | None = None  # None on an offline worker: its primary reads for it
        self._tasks: list[asyncio.Task] = []
        self._connected = True
        self._stopping = False  # set: read no more
        self._drained = False  # set: nothing more will be held; write what is left, then end

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start its loops (an offline worker: after its primary's, or with it: ``primary.start()``
        does not start it)."""
        loop = asyncio.get_running_loop()
        name = f"{self.keys.name}{' offline' if self.offline else ''}"
        if self.primary is None:
            self._reader = loop.create_task(self._read_forever(), name=f"read {name}")
        self._tasks = [
            loop.create_task(self._upkeep_forever(), name=f"upkeep {name}"),
            loop.create_task(self._write_replies_forever(), name=f"write {name}"),
        ]

    async def stop(self, grace: float = HELD_GRACE) -> None:
        """Stop reading; finish and answer what this worker holds (up to ``grace`` s).  Stops its
        offline stream's worker too (stop a primary, not its offline worker).

        The loops end at their next turn (a read blocks at most ``READ_BLOCK_MS``) rather
        than being cancelled in the middle of a Redis command, so no entry is read and lost.
        The upkeep and the writer run until everything held is answered: a read still in
        flight when the stop began may deliver entries after the last held one finished.
        """
        workers = [self] if self.secondary is None else [self, self.secondary]
        for worker in workers:
            worker._stopping = True
        self._room.set()
        if self._reader is not None:
            await _finish(self._reader, timeout=LOOP_GRACE)
        await self._leave()
        await asyncio.gather(*(worker._drain(grace) for worker in workers))

    async def _drain(self, grace: float) -> None:
        """Once nothing more is read: finish what this worker holds, write the answers, end its loops."""
        upkeep, writer = self._tasks
        await self._recover_own()  # anything Redis gave us that a lost read never showed
        if self._held:  # meanwhile the upkeep keeps them ours, so nobody takes them over
            await asyncio.wait(list(self._held.values()), timeout=grace)
        self._drained = True
        self._upkeep_now.set()
        self._outbox_ready.set()
        await _finish(upkeep, timeout=LOOP_GRACE)
        await _finish(writer, timeout=LOOP_GRACE)

    # ---------------------------------------------------------------- reading

    def _free_items(self) -> int:
        """How many more entries to read now: none while every slot is busy."""
        if self.batcher.inflight >= self.batcher.backend.capacity:
            return 0
        return max(self.batcher.max_batch_size - self.batcher.queue_depth, 0)

    async def _read_forever(self) -> None:
        """Read while the batcher has room: the request stream; the offline stream only when
        the request stream has nothing; when neither has anything, block on both."""
        workers = [self] if self.secondary is None else [self, self.secondary]
        while not self._stopping:
            count = self._free_items()
            if count == 0:
                self._room.clear()
                await wait_event(self._room, 0.1)
                continue
            try:
                answer = await self._read([self], count, block=None)
                if not answer and len(workers) > 1:
                    answer = await self._read(workers[1:], count, block=None)
                if not answer:
                    answer = await self._read(workers, count, block=READ_BLOCK_MS)
            except UNREACHABLE as error:
                # Redis may have delivered entries to us before the read failed (a client-side
                # timeout): they are pending in our name; read them back once it answers
                await self._redis_lost(error)
                for worker in workers:
                    await worker._recover_own()
                continue
            except ResponseError as error:
                await self._group_lost(error)
                continue
            for worker in workers:
                worker._redis_back()
            by_stream = {worker.stream: worker for worker in workers}
            for stream, entries in answer:
                worker = by_stream[_text(stream)]
                for entry_id, fields in entries:
                    worker._accept(entry_id, fields)

    async def _read(self, workers: list[StreamWorker], count: int, block: int | None) -> list:
        """New entries of these workers' streams: ``[(stream, entries)]``, only streams that gave some."""
        streams = {worker.stream: ">" for worker in workers}
        answer = await self.redis.xreadgroup(GROUP, self.consumer, streams, count=count, block=block)
        return [(stream, entries) for stream, entries in answer or [] if entries]

    async def _recover_own(self) -> None:
        """Serve entries pending in this consumer's name that it neither holds nor answered.

        ``XREADGROUP`` from id 0 reads a consumer's own pending entries back.  Without this,
        an entry delivered by a read whose answer never arrived would wait for another worker
        to reclaim it after the visibility timeout (or forever, with no other worker).
        """
        try:
            answer = await self.redis.xreadgroup(
                GROUP, self.consumer, {self.stream: "0"}, count=self.batcher.max_batch_size + len(self._held)
            )
        except (*UNREACHABLE, ResponseError):
            return  # the next failed read or stop tries again
        for _, entries in answer or []:
            for entry_id, fields in entries:
                if entry_id in self._held or entry_id in self._unacked:
                    continue
                if not fields:  # deleted meanwhile: only its pending record is left
                    self._post(Reply(entry_id, None, {}, time.time() + 60))
                    continue
                log.warning("serving entry %s that a lost read had left pending", entry_id.decode())
                self._accept(entry_id, fields)

    def _accept(self, entry_id: bytes, fields: dict) -> None:
        try:
            entry = parse_entry(entry_id, fields, self.keys)
        except BadEntry as error:
            log.warning("bad entry %s on %s: %s", entry_id.decode(), self.stream, error)
            invalid = InputError(f"bad request entry: {error}")
            self._answer_error(entry_id, error.reply_key, error.request_id, invalid, time.time() + 60)
            return
        if entry_id in self._held or entry_id in self._unacked:
            return  # reclaimed or read back while we still hold it or its answer
        task = asyncio.get_running_loop().create_task(self._serve(entry))
        self._held[entry_id] = task
        task.add_done_callback(lambda _: self._release(entry_id))

    def _release(self, entry_id: bytes) -> None:
        self._held.pop(entry_id, None)
        self._room.set()

    # ---------------------------------------------------------------- computing

    async def _serve(self, entry: Entry) -> None:
        remaining = entry.deadline - time.time()
        try:
            if remaining <= 0:
                raise DeadlineExceededError("deadline passed before a worker took the request")
            with priority.offline(self.offline):
                outputs = await self.batcher.submit(entry.items, timeout=remaining)
            fields = result_reply(entry.request_id, outputs)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            fields = error_reply(entry.request_id, error)
        self._post(Reply(entry.entry_id, entry.reply_key, fields, entry.deadline))

    def _answer_error(
        self, entry_id: bytes, reply_key: str | None, request_id: str, error: Exception, deadline: float
    ) -> None:
        self._post(Reply(entry_id, reply_key, error_reply(request_id, error), deadline))

    # ---------------------------------------------------------------- replying

    def _post(self, reply: Reply) -> None:
        self._unacked.add(reply.entry_id)
        self._outbox.append(reply)
        self._outbox_ready.set()

    async def _write_replies_forever(self) -> None:
        """Write every ready reply, ack and delete their entries: one round trip per batch."""
        while not (self._drained and not self._outbox):
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                replies, self._outbox = self._outbox, []
                try:
                    await self._write(replies)
                    self._unacked.difference_update(reply.entry_id for reply in replies)
                except UNREACHABLE as error:
                    now = time.time()
                    self._outbox = [reply for reply in replies if reply.deadline > now] + self._outbox
                    # too late to answer: left pending, read back (and failed) or reclaimed later
                    self._unacked.difference_update(reply.entry_id for reply in replies if reply.deadline <= now)
                    await self._redis_lost(error)

    async def _write(self, replies: list[Reply]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for reply in replies:
                if reply.reply_key is not None:
                    pipe.xadd(reply.reply_key, reply.fields, maxlen=REPLY_STREAM_LENGTH, approximate=True)
                    pipe.expire(reply.reply_key, REPLY_TTL_SECONDS)
            entry_ids = [reply.entry_id for reply in replies]
            pipe.xack(self.stream, GROUP, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            await pipe.execute()

    # ---------------------------------------------------------------- upkeep

    async def _upkeep_forever(self) -> None:
        """Every third of the visibility timeout: keep our entries, take dead workers' ones."""
        period = self.visibility_timeout / 3
        ticks = 0
        while not self._drained:
            try:
                await self._refresh_held()
                if not self._stopping:  # a leaving worker only keeps what it holds
                    if self.primary is None:  # the lease is the request stream's worker's
                        await self._announce()
                    if self._free_items() > 0:
                        await self._reclaim()
                    if ticks % 30 == 29:
                        await self._forget_stale_consumers()
            except UNREACHABLE as error:
                await self._redis_lost(error)
            except ResponseError as error:
                await self._group_lost(error)
            ticks += 1
            self._upkeep_now.clear()
            await wait_event(self._upkeep_now, period)

    async def _refresh_held(self) -> None:
        held = list(self._held)
        if held:
            await self.redis.xclaim(self.stream, GROUP, self.consumer, 0, held, justid=True)

    async def _reclaim(self) -> None:
        """Take entries left pending by another consumer idle past the visibility timeout.

        XPENDING (not XAUTOCLAIM) so that a worker never claims its own entries: when its
        loop stalls longer than the timeout, an own entry looks idle, and claiming it would
        count a delivery as if a worker had died.
        """
        idle_ms = int(self.visibility_timeout * 1000)
        pending = await self.redis.xpending_range(
            self.stream, GROUP, min="-", max="+",
            count=self.batcher.max_batch_size + len(self._held), idle=idle_ms,
        )
        deliveries = {
            row["message_id"]: row["times_delivered"] + 1  # XCLAIM counts one more
            for row in pending
            if _text(row["consumer"]) != self.consumer
        }
        if not deliveries:
            return
        claimed = await self.redis.xclaim(self.stream, GROUP, self.consumer, idle_ms, list(deliveries))
        if not claimed:
            return  # another worker was first, or the entries were deleted
        log.warning("reclaimed %d entries from a worker idle over %gs", len(claimed), self.visibility_timeout)
        for entry_id, fields in claimed:
            if deliveries.get(entry_id, 0) >= MAX_DELIVERIES:
                error = WorkerDiedError("workers died twice while running this request")
                reply_key = fields.get(b"reply", b"").decode(errors="replace")
                request_id = fields.get(b"id", b"").decode(errors="replace")
                valid = reply_key if self.keys.is_reply_key(reply_key) else None
                self._answer_error(entry_id, valid, request_id, error, time.time() + 60)
            elif fields:
                self._accept(entry_id, fields)

    async def _forget_stale_consumers(self) -> None:
        """Remove consumers of dead workers once they hold nothing."""
        stale_ms = STALE_CONSUMER_TIMEOUTS * self.visibility_timeout * 1000
        for consumer in await self.redis.xinfo_consumers(self.stream, GROUP):
            name = _text(consumer["name"])
            if name != self.consumer and consumer["pending"] == 0 and consumer["idle"] > stale_ms:
                await self.redis.xgroup_delconsumer(self.stream, GROUP, name)

    async def _announce(self) -> None:
        """Renew this worker's lease in ``<base>:workers`` (fronts count live workers there)
        and publish its counters for operators: ``HGETALL <base>:workers:<consumer>``."""
        now = time.time()
        stats = self.batcher.stats
        counters = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "batches": stats.batches,
            "items": stats.items,
            "batch_sizes": orjson.dumps({str(k): v for k, v in stats.batch_sizes.items()}),
            "updated": now,
        }
        stats_key = self.keys.worker_stats(self.consumer)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.workers, {self.consumer: now + self.visibility_timeout})
            pipe.zremrangebyscore(self.keys.workers, "-inf", now - 3600)
            pipe.expire(self.keys.workers, 86400)
            pipe.hset(stats_key, mapping=counters)
            pipe.expire(stats_key, max(int(self.visibility_timeout * STALE_CONSUMER_TIMEOUTS), 60))
            await pipe.execute()

    async def _leave(self) -> None:
        """Tell the fronts at once that this worker is gone (a graceful stop)."""
        try:
            await self.redis.zrem(self.keys.workers, self.consumer)
        except UNREACHABLE:
            pass

    # ---------------------------------------------------------------- outages

    async def _redis_lost(self, error: BaseException) -> None:
        if self._connected:
            log.warning("lost Redis on %s: %s; reconnecting", self.stream, error)
        self._connected = False
        await asyncio.sleep(RECONNECT_DELAY)

    def _redis_back(self) -> None:
        if not self._connected:
            log.warning("Redis is back on %s", self.stream)
            self._upkeep_now.set()
        self._connected = True

    async def _group_lost(self, error: ResponseError) -> None:
        """Redis restarted empty (no group): create the group again.  Other errors are logged."""
        if "NOGROUP" not in str(error):
            log.error("Redis refused a command on %s: %s", self.stream, error)
            await asyncio.sleep(1.0)
            return
        try:
            for worker in [self] if self.secondary is None else [self, self.secondary]:
                await ensure_group(self.redis, worker.stream)
            self._upkeep_now.set()  # Redis lost our lease too
        except UNREACHABLE as unreachable:
            await self._redis_lost(unreachable)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _finish(task: asyncio.Task, timeout: float) -> None:
    """Let ``task`` end by itself; cancel it if it has not after ``timeout`` s."""
    await asyncio.wait([task], timeout=timeout)
    if not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=1.0)


# --------------------------------------------------------------------------- process


def consumer_name() -> str:
    """Unique per worker process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def serve_batchers(
    batchers: dict[str, Batcher],
    url: str,
    prefix: str = "",
    visibility_timeout: float = 10.0,
    stop: asyncio.Event | None = None,
    tls: TLSFiles | None = None,
) -> None:
    """Load the models, then serve their streams until ``stop`` is set (or SIGTERM/SIGINT).

    Before any model loads, what waiting cannot fix stops the worker with a
    :class:`~.connection.RedisSetupError`: a wrong password, a URL of the wrong scheme for
    the port, a certificate, a command the ACL denies."""
    stop = stop or _stop_on_signals()
    client = connect(url, tls)
    await _wait_for_redis(client, url, tls, stop)
    consumer = consumer_name()
    if not stop.is_set():
        for name in batchers:
            await check_commands(client, url, WORKER_COMMANDS, StreamKeys(prefix, name), consumer, "worker")
    await asyncio.gather(*(batcher.start() for batcher in batchers.values()))
    workers: list[StreamWorker] = []  # the request streams' (each stops its offline stream's too)
    for name, batcher in batchers.items():
        first = StreamWorker(client, StreamKeys(prefix, name), batcher, consumer, visibility_timeout)
        offline = StreamWorker(client, first.keys, batcher, consumer, visibility_timeout, offline=True, primary=first)
        for worker in (first, offline):
            await _ensure_group_when_reachable(client, worker.stream, stop)
        offline.start()
        first.start()
        workers.append(first)
        log.warning("serving %s (and offline, %s) from %s as %s", first.stream, offline.stream, redact(url), consumer)
    try:
        await stop.wait()
    finally:
        await asyncio.gather(*(worker.stop() for worker in workers))
        await asyncio.gather(*(batcher.close() for batcher in batchers.values()))
        await client.aclose()


async def _wait_for_redis(client: aioredis.Redis, url: str, tls: TLSFiles | None, stop: asyncio.Event) -> None:
    warned = False
    while not stop.is_set():
        try:
            await client.ping()
            return
        except AuthenticationError as error:
            raise ValueError(f"Redis at {redact(url)} refused the credentials: {error}") from None
        except UNREACHABLE as error:
            problem = await diagnose(url, tls, error)
            if problem is not None:
                raise problem from None
            if not warned:
                log.warning("waiting for Redis at %s: %s", redact(url), error)
                warned = True
            await asyncio.sleep(RECONNECT_DELAY)


async def _ensure_group_when_reachable(client: aioredis.Redis, stream: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await ensure_group(client, stream)
            return
        except UNREACHABLE:
            await asyncio.sleep(RECONNECT_DELAY)


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (ValueError, RuntimeError):  # not the main thread: the caller stops us
            break
    return stop


def run_worker(settings: Settings, models: Mapping[str, ModelSpec]) -> None:
    """``batchserve worker``: serve ``models`` (name → spec) through Redis.

    The models are the apps' batched models (:func:`batchserve.apps.batched_models`, the
    same names as ``serve``'s, so the same streams), each on a batcher built as ``serve``
    builds it (:meth:`Batcher.from_settings`); no HTTP here.  Blocks until SIGTERM or SIGINT.
    """
    if not settings.redis.redis_url:
        raise ValueError("a worker needs --redis-url")
    configure_logging(settings.server.log_level.value)
    if not models:
        raise ValueError("these apps have no batched model to serve through Redis")
    redis = settings.redis
    tls = TLSFiles.of(redis)
    tls.check(redis.redis_url)  # before any batcher exists
    batchers = {name: Batcher.from_settings(spec, settings, name) for name, spec in models.items()}
    asyncio.run(serve_batchers(batchers, redis.redis_url, redis.redis_prefix, redis.visibility_timeout, tls=tls))
