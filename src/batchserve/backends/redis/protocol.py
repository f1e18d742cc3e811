"""The Redis protocol between fronts and workers: keys, entries, replies and errors.

Everything both sides must agree on is here; :mod:`.front` (``serve --backend redis``) and
:mod:`.worker` (``batchserve worker``) only use it.  Keys, for prefix ``P`` and model name
``M``::

    batchserve:P:M:requests            entries {id, reply, deadline, data}
    batchserve:P:M:requests:batch      the same, for offline batches (read when the first is empty)
    batchserve:P:M:replies:<client>    entries {id, data} or {id, error}
    batchserve:P:M:workers             sorted set: live workers, scored by lease expiry
    batchserve:P:M:workers:<consumer>  hash: a worker's counters (batches, batch sizes, ...)

``deadline`` is Unix time in seconds (hosts are expected to keep their clocks in sync),
``data`` and ``error`` are :mod:`batchserve.wire` payloads (msgpack, never pickle).  A
request's life: the front writes it (:func:`request_entry`), a worker reads it
(:func:`parse_entry`) and answers (:func:`result_reply` or :func:`error_reply`), the front
reads the answer (:func:`reply_id`, :func:`reply_result`).  The reclaim protocol is in
docs/ARCHITECTURE.md ("The Redis protocol").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from batchserve import wire
from batchserve.errors import (
    BatchserveError,
    DeadlineExceededError,
    InputError,
    ModelError,
    NotReadyError,
    OverloadedError,
    WorkerDiedError,
)

GROUP = "workers"
#: errors that mean "Redis is unreachable right now"
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
READ_BLOCK_MS = 500
RECONNECT_DELAY = 0.25

ERROR_KINDS: dict[str, type[BatchserveError]] = {
    cls.kind: cls
    for cls in (ModelError, DeadlineExceededError, NotReadyError, OverloadedError, WorkerDiedError, InputError)
}


@dataclass(frozen=True)
class StreamKeys:
    """The Redis keys of one model under one prefix."""

    prefix: str
    name: str

    @property
    def base(self) -> str:
        return f"batchserve:{self.prefix}:{self.name}"

    @property
    def requests(self) -> str:
        return f"{self.base}:requests"

    @property
    def offline_requests(self) -> str:
        """The stream of offline batches (:func:`batchserve.priority.offline`): workers read it
        only when :attr:`requests` gave them nothing."""
        return f"{self.base}:requests:batch"

    def stream(self, offline: bool) -> str:
        return self.offline_requests if offline else self.requests

    @property
    def workers(self) -> str:
        """Sorted set: worker (consumer) name → Unix time until which it counts as alive."""
        return f"{self.base}:workers"

    def worker_stats(self, consumer: str) -> str:
        return f"{self.base}:workers:{consumer}"

    def replies(self, client: str) -> str:
        return f"{self.base}:replies:{client}"

    def is_reply_key(self, key: str) -> bool:
        return key.startswith(f"{self.base}:replies:") and len(key) > len(self.base) + 9


def with_scheme(url: str) -> str:
    """Accept service-streamer's ``host:port`` too."""
    return url if "://" in url else f"redis://{url}"


async def ensure_group(client: aioredis.Redis, stream: str) -> None:
    """Create the workers' consumer group (and the stream) unless it exists.

    The group starts at ``0`` so entries added before any worker came up are served.
    """
    try:
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def encode_error(error: BaseException) -> bytes:
    """An error as a wire payload: its kind and message (any other exception is a model error)."""
    kind = error.kind if isinstance(error, BatchserveError) else ModelError.kind
    message = error.message if isinstance(error, BatchserveError) else f"{type(error).__name__}: {error}"
    return wire.dumps({"kind": kind, "message": message})


def decode_error(payload: bytes) -> BatchserveError:
    """The error a payload names, as batchserve's class of that kind (unreadable: a model error)."""
    try:
        fields = wire.loads(payload)
        cls = ERROR_KINDS.get(fields["kind"], ModelError)
        return cls(str(fields["message"]))
    except (wire.WireError, KeyError, TypeError):
        return ModelError("a worker sent an unreadable error")


def redact(url: str) -> str:
    """The URL without its password, for logs and /readyz."""
    scheme, sep, rest = with_scheme(url).partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}"


# --------------------------------------------------------------------------- entries and replies


def request_entry(request_id: str, reply_key: str, unix_deadline: float, batch: list) -> dict[str, Any]:
    """The request entry a front adds for one batch (read back by :func:`parse_entry`)."""
    return {"id": request_id, "reply": reply_key, "deadline": repr(unix_deadline), "data": wire.dumps(batch)}


class BadEntry(ValueError):
    """An entry that is not a valid request; ``reply_key`` is None when nobody can be told."""

    def __init__(self, message: str, reply_key: str | None, request_id: str):
        super().__init__(message)
        self.reply_key = reply_key
        self.request_id = request_id


@dataclass
class Entry:
    """A request entry, checked and decoded."""

    entry_id: bytes
    request_id: str
    reply_key: str
    deadline: float  # Unix time
    items: list


def parse_entry(entry_id: bytes, fields: dict, keys: StreamKeys) -> Entry:
    """Check and decode one request entry; raise :class:`BadEntry` saying what is wrong."""
    reply_key = fields.get(b"reply", b"").decode(errors="replace")
    request_id = fields.get(b"id", b"").decode(errors="replace")
    answerable = reply_key if keys.is_reply_key(reply_key) and request_id else None

    def bad(message: str) -> BadEntry:
        return BadEntry(message, answerable, request_id)

    if answerable is None:
        raise bad(f"entry has no id or no valid reply stream (reply={reply_key!r})")
    try:
        deadline = float(fields[b"deadline"])
        items = wire.loads(fields[b"data"])
    except KeyError as missing:
        raise bad(f"entry has no {missing.args[0].decode()!r} field") from None
    except (ValueError, wire.WireError) as error:
        raise bad(f"entry is malformed: {error}") from None
    if not math.isfinite(deadline):
        raise bad(f"entry deadline must be a finite Unix time, not {deadline!r}")
    if not isinstance(items, list) or not items:
        raise bad("entry data must be a non-empty list of items")
    return Entry(entry_id, request_id, reply_key, deadline, items)


def result_reply(request_id: str, outputs: list) -> dict[str, Any]:
    """A worker's answer with the batch's outputs (raises if they cannot cross the wire)."""
    return {"id": request_id, "data": wire.dumps(outputs)}


def error_reply(request_id: str, error: BaseException) -> dict[str, Any]:
    """A worker's answer with an error: the caller gets it as the same kind of error."""
    return {"id": request_id, "error": encode_error(error)}


def reply_id(fields: dict) -> str:
    """The request id a reply answers."""
    return fields.get(b"id", b"").decode(errors="replace")


def reply_result(fields: dict) -> list:
    """The outputs of a reply; raise the worker's error, or :class:`ModelError` if unreadable."""
    if b"error" in fields:
        raise decode_error(fields[b"error"])
    try:
        return wire.loads(fields.get(b"data", b""))
    except wire.WireError as error:
        raise ModelError(f"a worker sent an unreadable reply: {error}") from None
