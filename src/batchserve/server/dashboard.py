"""``/dashboard``: live charts of queue depth, batch sizes, latency percentiles and errors.

* ``GET /dashboard`` — the page (``web/dashboard.html``: plain HTML and canvas, no build
  step, nothing fetched from elsewhere);
* ``GET /dashboard/stats`` — a snapshot of cumulative counters.  The page polls it every
  second and plots the differences between consecutive snapshots, so the server keeps no
  state per viewer.

It reads the same figures as ``/metrics``: the batchers' stats and the app's Prometheus
instruments, so it is served only when metrics are on.  When a generation app is served, its
engine's figures (``batchserve_generation_*``, from the generation collector registered with
the app's metrics) come as ``generation``: running rows, waiting requests, the steps and
tokens generated so far, and the requests given their first tokens with the seconds they
waited for them (their time to first token); ``generation`` is ``null`` otherwise.
"""

from __future__ import annotations

import functools
import math
import time
from importlib import resources
from typing import Callable, Iterable

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from batchserve.batching import Batcher
from batchserve.server.metrics import Metrics

# Requests that are not traffic to the models: left out of the latency and rate charts.
OWN_ROUTES = frozenset({"/metrics", "/healthz", "/readyz", "/dashboard", "/dashboard/stats", "unmatched"})


@functools.cache
def page() -> str:
    return (resources.files("batchserve") / "web" / "dashboard.html").read_text(encoding="utf-8")


def snapshot(metrics: Metrics, batchers: Iterable[Batcher]) -> dict:
    """Cumulative counters now: per model, request latency histogram, errors by kind."""
    return {
        "time": time.time(),
        "models": {batcher.name: _model_figures(batcher) for batcher in batchers},
        "latency": _latency_histogram(metrics),
        "errors": _counter_by_label(metrics.errors_total, "kind"),
        "generation": _generation_figures(metrics),
    }


# the generation engine's Prometheus samples (apps/llm.py GenerationCollector) and their keys here
GENERATION_SAMPLES = {
    "batchserve_generation_active_rows": "active_rows",
    "batchserve_generation_waiting_requests": "waiting_requests",
    "batchserve_generation_steps_total": "steps",
    "batchserve_generation_tokens_total": "tokens_generated",
    "batchserve_generation_first_token_seconds_count": "first_tokens",
    "batchserve_generation_first_token_seconds_sum": "first_token_seconds",
}


def _generation_figures(metrics: Metrics) -> dict | None:
    """The generation engine's gauges and counters, or None when no generation app is served."""
    figures: dict[str, float] = {}
    for family in metrics.registry.collect():
        if not family.name.startswith("batchserve_generation_"):
            continue
        for sample in family.samples:
            key = GENERATION_SAMPLES.get(sample.name)
            if key is not None:
                figures[key] = figures.get(key, 0.0) + sample.value
    return figures or None


def _model_figures(batcher: Batcher) -> dict:
    """Batches as dispatched, and passes (calls of the model) apart: with a token budget
    (``token_budget``) one batch runs as several passes."""
    stats = batcher.stats
    return {
        "queue_depth": batcher.queue_depth,
        "inflight": batcher.inflight,
        "batches": stats.batches,
        "items": stats.items,
        "batch_sizes": {str(size): count for size, count in sorted(stats.batch_sizes.items())},
        "passes": sum(stats.pass_sizes.values()),
        "pass_rows": sum(size * count for size, count in stats.pass_sizes.items()),
        "token_budget": batcher.max_batch_tokens,
    }


def _latency_histogram(metrics: Metrics) -> dict:
    """Request latency summed over the model routes: bucket bounds and cumulative counts."""
    cumulative: dict[float, float] = {}
    statuses: dict[str, float] = {}
    for family in metrics.request_seconds.collect():
        for sample in family.samples:
            if sample.labels.get("route") in OWN_ROUTES:
                continue
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                cumulative[bound] = cumulative.get(bound, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                status = sample.labels["status"]
                statuses[status] = statuses.get(status, 0.0) + sample.value
    bounds = sorted(cumulative)
    return {
        "bounds": [bound if math.isfinite(bound) else None for bound in bounds],  # None: +Inf
        "cumulative": [cumulative[bound] for bound in bounds],
        "by_status": statuses,
    }


def _counter_by_label(counter, label: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = sample.labels[label]
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def build_router(metrics: Metrics, batchers: Callable[[], Iterable[Batcher]]) -> APIRouter:
    router = APIRouter(tags=["dashboard"], include_in_schema=False)

    @router.get("/dashboard", summary="Live charts of queue, batches, latency and errors")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page())

    @router.get("/dashboard/stats", summary="Cumulative counters the dashboard plots")
    async def stats() -> dict:
        return snapshot(metrics, batchers())

    return router
