"""What an application mounted on the server is: routes plus the batchers behind them."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from fastapi import APIRouter, Header

from batchserve.batching import Batcher
from batchserve.errors import InputError
from batchserve.model import ModelSpec
from batchserve.settings import MIN_REQUEST_TIMEOUT, Settings
from batchserve.tokens import Vocabulary


class Service:
    """One application: its FastAPI routes and the batchers (models) it serves.

    The server starts every service after it begins listening (``/readyz`` answers 503
    until all are loaded) and closes them on shutdown.  Apps whose engine is not a
    :class:`Batcher` override :meth:`start`, :meth:`close`, :meth:`ready` and :meth:`describe`.

    What the server reads from a service: :attr:`router` (mounted), :attr:`batchers`
    (their queues and batches go to ``/metrics`` and the dashboard), :attr:`collectors`
    (more Prometheus collectors; one object shared by several services is registered
    once), :attr:`models` (listed by ``GET /v1/models``), :meth:`vocabularies` (the models
    ``/tokenize`` and ``/detokenize`` serve), :attr:`error` (set when :meth:`start` failed),
    and the lifecycle methods below; a batch job reads :attr:`pads_rows`.
    """

    #: whether the model runs a batch's rows padded to the longest: a batch job then sends
    #: its lines sorted by length (:mod:`batchserve.batchjob.runner`); the generation engine
    #: decodes rows of any length together, and its lines keep the file's order
    pads_rows = True

    def __init__(
        self,
        name: str,
        router: APIRouter,
        batchers: dict[str, Batcher] | None = None,
        collectors: list[Any] | None = None,
        vocabularies: Callable[[], dict[str, Vocabulary]] | None = None,
    ):
        self.name = name
        self.router = router
        self.batchers = batchers or {}
        self.collectors = collectors or []
        self.error: str | None = None
        self._vocabularies = vocabularies

    @property
    def tokenizes(self) -> bool:
        """Whether this service's models are served by ``/tokenize`` (once they are loaded)."""
        return self._vocabularies is not None

    def vocabularies(self) -> dict[str, Vocabulary]:
        """The served models' vocabularies, by model name (``/tokenize``); none by default."""
        return self._vocabularies() if self._vocabularies is not None else {}

    @property
    def models(self) -> list[str]:
        """Names of the models this service serves."""
        return list(self.batchers)

    def preload(self) -> None:
        """Load models now, in a process about to fork HTTP workers that will share them."""
        for batcher in self.batchers.values():
            batcher.backend.preload()

    async def start(self) -> None:
        await asyncio.gather(*(batcher.start() for batcher in self.batchers.values()))

    async def close(self, grace: float = 0.0) -> None:
        await asyncio.gather(*(batcher.close(grace) for batcher in self.batchers.values()))

    def ready(self) -> bool:
        return self.error is None and all(batcher.ready for batcher in self.batchers.values())

    def describe(self) -> dict[str, Any]:
        models = {
            name: {
                "ready": batcher.ready,
                "queue_depth": batcher.queue_depth,
                "batching": batching_of(batcher),
                **batcher.backend.describe(),
            }
            for name, batcher in self.batchers.items()
        }
        return {"ready": self.ready(), "error": self.error, "models": models}


def batching_of(batcher: Batcher) -> dict[str, Any]:
    """The limits ``batcher`` runs with (its model's own settings over the server-wide ones), for ``/readyz``."""
    return {
        "max_batch_size": batcher.max_batch_size,
        "max_latency": batcher.max_latency,
        "max_batch_tokens": batcher.max_batch_tokens,
        "max_queue_size": batcher.max_queue_size,
        "timeout": batcher.timeout,
    }


def make_batcher(spec: ModelSpec, settings: Settings, name: str) -> Batcher:
    """A batcher for one model, on the backend and with the limits the settings name
    (:meth:`Batcher.from_settings`: ``batchserve worker`` builds the same)."""
    return Batcher.from_settings(spec, settings, name)


TIMEOUT_HEADER = "X-Request-Timeout"


def deadline_dependency(settings: Settings, per_model: bool = False):
    """A FastAPI dependency reading the per-request deadline header (seconds).

    With ``per_model``, a request without the header gets None: the batcher applies its
    model's own ``timeout`` (a config file's ``models.NAME.timeout``), not the server-wide one.

    The function it returns also carries ``from_header = (header name, parse)``, so that a
    :class:`~batchserve.server.json_route.JSONBodyRoute` reads the header without FastAPI's
    dependency solving (the same parse, the same errors)."""
    default, limit = settings.batching.timeout, settings.batching.max_timeout
    shortest = min(MIN_REQUEST_TIMEOUT, limit)  # shorter is the client's mistake (a 422), not a 504
    bounds = f"from {shortest:g} to {limit:g} seconds"

    def number_schema(schema: dict) -> None:  # parsed below, for messages that name the header
        schema.clear()
        schema.update({"type": "number", "minimum": shortest, "maximum": limit})

    def parse(value: str | None) -> float | None:
        if value is None:
            return None if per_model else default
        try:
            seconds = float(value)
        except ValueError:
            raise InputError(f"{TIMEOUT_HEADER} must be a number of seconds, {bounds}", param=TIMEOUT_HEADER) from None
        if not shortest <= seconds <= limit:  # NaN included
            raise InputError(f"{TIMEOUT_HEADER} must be {bounds} (got {value.strip()[:40]})", param=TIMEOUT_HEADER)
        return seconds

    # async: FastAPI calls a sync dependency in a thread pool, one thread hop per request
    async def request_timeout(
        x_request_timeout: str | None = Header(
            default=None,
            description=f"the request's deadline, {bounds} (default: "
            + ("the model's timeout" if per_model else f"{default:g}") + ")",
            json_schema_extra=number_schema,
        ),
    ) -> float | None:
        return parse(x_request_timeout)

    request_timeout.from_header = (TIMEOUT_HEADER.lower(), parse)
    return request_timeout
