"""Redis backend, the front side: batches go to remote workers through a Redis Stream.

One stream of requests per model and prefix; the workers (:mod:`.worker`) read it with a
consumer group.  Each front (each :class:`RedisBackend`) has its own reply stream, which
only it reads.  The keys, entries and replies are :mod:`.protocol`'s.

While Redis is unreachable, or no worker serves the model, :meth:`RedisBackend.run`
fails at once with :class:`~batchserve.errors.NotReadyError` (HTTP 503); batches waiting
for a reply when Redis goes away fail the same way.  A background task reconnects and the
front serves again.  With ``wait_for_workers=True`` (``serve --wait-for-workers``,
service-streamer's ``RedisStreamer``) a batch sent while no worker holds a lease is written
to the request stream all the same and waits there for its answer until its deadline: a
worker started later (an autoscaler watching the stream's length starts the first one)
finds it.  A batch whose deadline passed is answered with a deadline error (504) and its
entry deleted, so no worker computes it (a worker that read it already answers it with a
deadline error, uncomputed).

A batch run inside :func:`batchserve.priority.offline` (the batcher runs a batch of offline
items only so: a batch job's) goes to the model's offline stream instead
(:attr:`~.protocol.StreamKeys.offline_requests`), which workers read only when the request
stream gives them nothing: online batches never wait behind a job's backlog in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError

from batchserve.backends.base import Backend, Backlog, batch_deadline
from batchserve.backends.redis.connection import FRONT_COMMANDS, TLSFiles, check_commands, connect, diagnose
from batchserve.backends.redis.protocol import (
    GROUP,
    READ_BLOCK_MS,
    RECONNECT_DELAY,
    UNREACHABLE,
    StreamKeys,
    ensure_group,
    redact,
    reply_id,
    reply_result,
    request_entry,
)
from batchserve.errors import BatchserveError, DeadlineExceededError, NotReadyError
from batchserve.model import ModelSpec
from batchserve.priority import is_offline
from batchserve.settings import Settings

log = logging.getLogger("batchserve.redis")

#: a request stream longer than this is trimmed (oldest first) so Redis memory stays bounded
MAX_STREAM_LENGTH = 100_000
WORKERS_CHECK_PERIOD = 1.0  # seconds between counts of live workers
#: how long past a batch's deadline the front waits for its answer: a worker's own deadline
#: error (or a result computed just in time) is the clearer answer
REPLY_GRACE = 1.0
CLOSE_READER_TIMEOUT = 1.0  # seconds the reply reader gets to end when cancelled, before its socket is closed


class RedisBackend(Backend):
    """Sends each batch as one stream entry and awaits the reply on this front's stream.

    ``capacity`` is how many batches may wait on remote workers at once (large: the
    workers form their own batches from the stream, up to their ``max_batch_size``).
    While no worker holds a lease, :meth:`run` fails at once with ``NotReadyError``; with
    ``wait_for_workers=True`` it writes the batch all the same and waits for its answer
    until the batch's deadline, then deletes the entry and fails with
    ``DeadlineExceededError`` (a ``TimeoutError``).
    """

    def __init__(
        self,
        url: str,
        name: str,
        prefix: str = "",
        max_inflight: int = 1024,
        default_timeout: float = 30.0,
        wait_for_workers: bool = False,
        tls: TLSFiles | None = None,
    ):
        self.url = url
        self.tls = tls or TLSFiles()
        self.tls.check(url)  # files that cannot work are refused now, not at start
        self.keys = StreamKeys(prefix, name)
        self.client_id = uuid.uuid4().hex
        self.reply_key = self.keys.replies(self.client_id)
        self.max_inflight = max_inflight
        self.default_timeout = default_timeout
        self.wait_for_workers = wait_for_workers
        self.connected = False
        self.live_workers = 0
        self.duplicate_replies = 0
        self._redis: aioredis.Redis | None = None
        self._ids = itertools.count()
        self._waiting: dict[str, asyncio.Future] = {}
        self._entries: dict[str, tuple[str, bytes]] = {}  # request id → (stream, entry id), while it waits for its answer
        self._reader: asyncio.Task | None = None
        self._last_reply_id = "0"
        self._workers_checked = 0.0
        self._closing = False

    @classmethod
    def from_settings(cls, spec: ModelSpec, settings: Settings, name: str) -> "RedisBackend":
        """The front of remote workers (``batchserve worker``); ``spec`` runs there, not here."""
        if not settings.redis.redis_url:
            raise ValueError("--backend redis needs --redis-url")
        return cls(
            settings.redis.redis_url,
            name,
            prefix=settings.redis.redis_prefix,
            max_inflight=settings.batching.max_queue_size,
            default_timeout=settings.batching.timeout,
            wait_for_workers=settings.redis.wait_for_workers,
            tls=TLSFiles.of(settings.redis),
        )

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect (retrying until Redis answers), then start reading replies.

        What waiting cannot fix fails the start at once (:class:`~.connection.RedisSetupError`):
        a URL of the wrong scheme for the port, a certificate, a command the ACL denies."""
        self._closing = False
        self._redis = connect(self.url, self.tls)
        while not await self._reconnect(starting=True):
            await asyncio.sleep(RECONNECT_DELAY)
        self._reader = asyncio.get_running_loop().create_task(self._read_replies_forever())
        self._capacity_changed()

    @property
    def capacity(self) -> int:
        return self.max_inflight if self._reader is not None else 0

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader], timeout=CLOSE_READER_TIMEOUT)
            if not self._reader.done() and self._redis is not None:
                # redis-py (8.2) may swallow the cancellation of a blocking XREAD and read on,
                # with no deadline (a front closed right after its start hung): close its socket
                await self._redis.connection_pool.disconnect()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        unanswered = list(self._entries.values())
        self._fail_waiting(NotReadyError("the front is shutting down"))
        if self._redis is not None:
            if unanswered and self.connected:  # nobody will read their answers: no worker should compute them
                with contextlib.suppress(*UNREACHABLE, asyncio.TimeoutError):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for stream in {stream for stream, _ in unanswered}:
                            pipe.xdel(stream, *[entry for where, entry in unanswered if where == stream])
                        await asyncio.wait_for(pipe.execute(), CLOSE_READER_TIMEOUT)
            await self._redis.aclose()
            self._redis = None

    def describe(self) -> dict:
        return {
            "backend": "redis",
            "redis": redact(self.url),
            "connected": self.connected,
            "workers": self.live_workers,
            "wait_for_workers": self.wait_for_workers,
            "stream": self.keys.requests,
            "offline_stream": self.keys.offline_requests,
            "waiting": len(self._waiting),
            "duplicate_replies": self.duplicate_replies,
        }

    async def backlog(self) -> Backlog | None:
        """The request streams now (online and offline), in one round trip: their length
        (batches waiting for a worker or being computed: entries are deleted once answered),
        their pending entries (read by a worker, not yet answered) and the live workers.  None
        while Redis is unreachable.

        The length is the autoscaling signal: a worker reads only while it has a free slot,
        so batches waiting for capacity are in the stream but not pending."""
        if not self.connected or self._redis is None:
            return None
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xlen(self.keys.requests)
                pipe.xpending(self.keys.requests, GROUP)
                pipe.xlen(self.keys.offline_requests)
                pipe.xpending(self.keys.offline_requests, GROUP)
                pipe.zcount(self.keys.workers, time.time(), "+inf")
                length, pending, offline_length, offline_pending, workers = await pipe.execute()
        except UNREACHABLE as error:
            self._lost(error)
            return None
        except ResponseError:  # no group yet (Redis restarted empty): the reader creates it again
            return None
        self.live_workers = workers
        return Backlog(
            entries=length + offline_length,
            pending=pending["pending"] + offline_pending["pending"],
            workers=workers,
            offline_entries=offline_length,
            offline_pending=offline_pending["pending"],
        )

    # ---------------------------------------------------------------- run

    async def run(self, batch: list) -> list:
        if not self.connected or self._redis is None:
            raise NotReadyError("Redis is unreachable; retry shortly")
        loop = asyncio.get_running_loop()
        deadline = batch_deadline.get() or loop.time() + self.default_timeout
        if not self.wait_for_workers and self.live_workers == 0 and await self._count_workers() == 0:
            raise NotReadyError(f"no worker serves {self.keys.name!r}; start `batchserve worker`")
        request_id = str(next(self._ids))
        reply = loop.create_future()
        self._waiting[request_id] = reply
        stream = self.keys.stream(offline=is_offline())
        entry_id = None
        try:
            entry_id = await self._send(stream, request_id, batch, time.time() + deadline - loop.time())
            self._entries[request_id] = (stream, entry_id)
            return await asyncio.wait_for(reply, max(deadline - loop.time(), 0) + REPLY_GRACE)
        except asyncio.TimeoutError:
            await self._forget(stream, entry_id)
            if self.live_workers == 0:
                raise DeadlineExceededError(f"no worker served {self.keys.name!r} before the deadline") from None
            raise DeadlineExceededError("no worker answered before the deadline") from None
        finally:
            self._waiting.pop(request_id, None)
            self._entries.pop(request_id, None)

    async def _forget(self, stream: str, entry_id: bytes | None) -> None:
        """Delete the entry of a batch given up on: no worker computes it, and the stream's
        length (what an autoscaler watches) counts only batches someone still waits for."""
        if entry_id is None or self._redis is None or not self.connected:
            return
        try:
            await self._redis.xdel(stream, entry_id)
        except UNREACHABLE as error:
            self._lost(error)

    async def _send(self, stream: str, request_id: str, batch: list, unix_deadline: float) -> bytes:
        """Add the batch's entry to ``stream`` (the request stream or the offline one); its entry id."""
        entry = request_entry(request_id, self.reply_key, unix_deadline, batch)
        try:
            return await self._redis.xadd(stream, entry, maxlen=MAX_STREAM_LENGTH, approximate=True)
        except UNREACHABLE as error:
            self._lost(error)
            raise NotReadyError("Redis is unreachable; retry shortly") from None

    # ---------------------------------------------------------------- replies

    async def _read_replies_forever(self) -> None:
        while not self._closing:
            if not self.connected:
                try:
                    reconnected = await self._reconnect()
                except AuthenticationError as error:
                    log.error("Redis refused our credentials: %s", error)
                    reconnected = False
                except ResponseError as error:  # a Redis just restarted may refuse a command: try again
                    log.warning("Redis refused a command while reconnecting: %s", error)
                    reconnected = False
                if not reconnected:
                    await asyncio.sleep(RECONNECT_DELAY)
                continue
            try:
                await self._count_workers_now_and_then()
                answer = await self._redis.xread({self.reply_key: self._last_reply_id}, block=READ_BLOCK_MS)
            except UNREACHABLE as error:
                if self._closing:  # close() shut the socket under a read
                    return
                self._lost(error)
                continue
            for _, entries in answer:
                for entry_id, fields in entries:
                    self._last_reply_id = entry_id
                    self._deliver(fields)

    def _deliver(self, fields: dict) -> None:
        future = self._waiting.get(reply_id(fields))
        if future is None or future.done():
            self.duplicate_replies += 1  # late (after the deadline) or answered twice
            return
        try:
            future.set_result(reply_result(fields))
        except BatchserveError as error:  # the worker's error, or an unreadable reply
            future.set_exception(error)

    async def _count_workers_now_and_then(self) -> None:
        if time.time() - self._workers_checked >= WORKERS_CHECK_PERIOD:
            self.live_workers = await self._redis.zcount(self.keys.workers, time.time(), "+inf")
            self._workers_checked = time.time()

    async def _count_workers(self) -> int:
        """Count live workers now (while none were seen: a worker may have just come up)."""
        try:
            self.live_workers = await self._redis.zcount(self.keys.workers, time.time(), "+inf")
        except UNREACHABLE as error:
            self._lost(error)
            raise NotReadyError("Redis is unreachable; retry shortly") from None
        return self.live_workers

    async def _reconnect(self, starting: bool = False) -> bool:
        """One attempt to reach Redis and set up the stream; True when it worked.

        ``starting``: the first connection, which also checks the ACL and says why a failed
        connection will not work by waiting (raising :class:`~.connection.RedisSetupError`)."""
        try:
            # connections from before an outage are dead: drop them all now, rather than
            # have each fail one request later
            await self._redis.connection_pool.disconnect()
            await self._redis.ping()
            if starting:
                await check_commands(self._redis, self.url, FRONT_COMMANDS, self.keys, self.client_id, "front")
            for stream in (self.keys.requests, self.keys.offline_requests):
                await ensure_group(self._redis, stream)
            self._workers_checked = 0.0
            await self._count_workers_now_and_then()
        except AuthenticationError:
            raise  # a wrong password does not fix itself: fail loudly
        except UNREACHABLE as error:
            problem = await diagnose(self.url, self.tls, error) if starting else None
            if problem is not None:
                raise problem from None
            return False
        if not self.connected:
            log.info("connected to %s", redact(self.url))
        self.connected = True
        return True

    def _lost(self, error: BaseException) -> None:
        """Redis went away: fail fast from now on, and fail whoever waits on a reply.

        A reply written before the outage may never arrive (Redis may have restarted
        empty), so waiting for it would only turn a quick 503 into a slow 504.
        """
        if self.connected:
            log.warning("lost Redis at %s: %s", redact(self.url), error)
        self.connected = False
        self._fail_waiting(NotReadyError("lost the connection to Redis; retry shortly"))

    def _fail_waiting(self, error: BatchserveError) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
