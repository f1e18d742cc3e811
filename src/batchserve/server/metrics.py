"""Prometheus metrics: request latency, errors by kind, and each batcher's queue and batches.

``batchserve_batch_size`` is the items of each batch the batcher dispatched;
``batchserve_pass_size`` the rows of each call of the model (a token budget runs one batch
as several passes; an error splits a batch to find its bad items).

Request metrics are recorded by a small ASGI middleware; batcher figures are read from
:class:`~batchserve.batching.BatcherStats` at scrape time, so the batching path pays nothing.

A backend whose work queues elsewhere (redis: the model's request streams, online and
offline) has its backlog sampled at scrape time too (:class:`BacklogSampler`: one round trip per
model, at most every :data:`BACKLOG_MAX_AGE` seconds, never per request):
``batchserve_stream_entries`` (the autoscaling signal), ``batchserve_stream_pending`` and
``batchserve_stream_workers``; of the first two, the offline stream's share (batch jobs') in
``batchserve_stream_offline_entries`` and ``batchserve_stream_offline_pending``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchserve.backends.base import Backlog
from batchserve.batching import Batcher
from batchserve.batchjob.runner import INTERNAL_SCOPE

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: a scrape within this many seconds of the last backlog sample reuses it
BACKLOG_MAX_AGE = 1.0
#: a scrape waits at most this long for the backlog samples (the rest of /metrics never waits on Redis)
BACKLOG_TIMEOUT = 1.0


class BacklogSampler:
    """The backlog of each model whose backend queues elsewhere, sampled when /metrics is
    scraped (:meth:`refresh`), at most every :data:`BACKLOG_MAX_AGE` seconds."""

    def __init__(self, batchers: Callable[[], Iterable[Batcher]]):
        self.batchers = batchers
        self.samples: dict[str, Backlog] = {}
        self._sampled = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:  # concurrent scrapes share one sample
            if time.monotonic() - self._sampled < BACKLOG_MAX_AGE:
                return
            batchers = list(self.batchers())
            try:
                found = await asyncio.wait_for(
                    asyncio.gather(*(batcher.backend.backlog() for batcher in batchers)), BACKLOG_TIMEOUT
                )
            except asyncio.TimeoutError:  # Redis too slow to answer: no figures rather than old ones
                found = [None] * len(batchers)
            self.samples = {batcher.name: sample for batcher, sample in zip(batchers, found) if sample is not None}
            self._sampled = time.monotonic()

    def collect(self):
        gauges = {
            "entries": GaugeMetricFamily(
                "batchserve_stream_entries",
                "Batches in the model's request streams, online and offline: waiting for a worker or being computed"
                " (the autoscaling signal)",
                labels=["model"],
            ),
            "pending": GaugeMetricFamily(
                "batchserve_stream_pending",
                "Batches read by a worker from the model's request streams, online and offline, not yet answered",
                labels=["model"],
            ),
            "workers": GaugeMetricFamily(
                "batchserve_stream_workers", "Live workers serving the model's request streams", labels=["model"]
            ),
            "offline_entries": GaugeMetricFamily(
                "batchserve_stream_offline_entries",
                "Of batchserve_stream_entries, those in the offline stream (batch jobs' work)",
                labels=["model"],
            ),
            "offline_pending": GaugeMetricFamily(
                "batchserve_stream_offline_pending",
                "Of batchserve_stream_pending, those read from the offline stream",
                labels=["model"],
            ),
        }
        for name, sample in self.samples.items():
            for field, gauge in gauges.items():
                gauge.add_metric([name], getattr(sample, field))
        yield from gauges.values()


class BatcherCollector:
    """Exposes every batcher's queue depth, in-flight batches and batch-size histogram."""

    def __init__(self, batchers: Callable[[], Iterable[Batcher]]):
        self.batchers = batchers

    def collect(self):
        depth = GaugeMetricFamily("batchserve_queue_depth", "Items waiting for a batch", labels=["model"])
        inflight = GaugeMetricFamily("batchserve_inflight_batches", "Batches running now", labels=["model"])
        workers_up = GaugeMetricFamily(
            "batchserve_workers_up", "Workers (slots) able to run a batch now", labels=["model"]
        )
        sizes = HistogramMetricFamily(
            "batchserve_batch_size",
            "Items per batch dispatched (those answered); a token budget runs one as several passes",
            labels=["model"],
        )
        pass_sizes = HistogramMetricFamily(
            "batchserve_pass_size",
            "Rows per call of the model: a pass of a token-budgeted batch, or a whole batch",
            labels=["model"],
        )
        compute = CounterMetricFamily(
            "batchserve_compute_seconds", "Time spent in predict()", labels=["model"]
        )
        tokens = CounterMetricFamily(
            "batchserve_batch_tokens",
            "Tokens in the passes run (models with a token budget): real, and padded (rows x longest)",
            labels=["model", "kind"],
        )
        passes = CounterMetricFamily("batchserve_passes", "Passes run (models with a token budget)", labels=["model"])
        for batcher in self.batchers():
            depth.add_metric([batcher.name], batcher.queue_depth)
            inflight.add_metric([batcher.name], batcher.inflight)
            workers_up.add_metric([batcher.name], batcher.backend.capacity)
            stats = batcher.stats
            sizes.add_metric([batcher.name], _cumulative(stats.batch_sizes), stats.items)
            rows = sum(size * count for size, count in stats.pass_sizes.items())
            pass_sizes.add_metric([batcher.name], _cumulative(stats.pass_sizes), rows)
            compute.add_metric([batcher.name], stats.compute_seconds)
            if batcher.max_batch_tokens is not None:
                tokens.add_metric([batcher.name, "real"], stats.real_tokens)
                tokens.add_metric([batcher.name, "padded"], stats.padded_tokens)
                passes.add_metric([batcher.name], stats.passes)
        yield from (depth, inflight, workers_up, sizes, pass_sizes, compute, tokens, passes)


class Metrics:
    """The registry of one app, and the instruments the server records into."""

    def __init__(self, batchers: Callable[[], Iterable[Batcher]]):
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "batchserve_request_duration_seconds",
            "HTTP request latency",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors_total = Counter(
            "batchserve_errors_total", "Error responses by kind", ["kind"], registry=self.registry
        )
        self.registry.register(BatcherCollector(batchers))
        self.backlog = BacklogSampler(batchers)
        self.registry.register(self.backlog)


class RequestMetricsMiddleware:
    """Times each HTTP request by route template and status code (a ``/v1/batches`` batch's own
    lines are not HTTP requests: its ``request_counts`` count them)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get(INTERNAL_SCOPE):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.request_seconds.labels(path, str(status)).observe(time.perf_counter() - started)


def _cumulative(counts: dict[int, int]) -> list[tuple[str, float]]:
    buckets, total = [], 0
    for bound in BATCH_SIZE_BUCKETS:
        total = sum(count for size, count in counts.items() if size <= bound)
        buckets.append((str(bound), total))
    buckets.append(("+Inf", sum(counts.values())))
    return buckets
