"""A benchmark run in figures: throughput, latency percentiles, errors, batch sizes."""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from batchserve.bench.load import LoadResult

PERCENTILES = (50, 95, 99)


@dataclass
class Summary:
    url: str
    mode: str  # "closed" (fixed concurrency) or "open" (fixed rate)
    concurrency: int | None
    rate: float | None
    elapsed_s: float
    sent: int
    ok: int
    errors: dict[str, int]  # status code or exception name -> count
    throughput: float  # successful answers per second within the run's window
    latency_ms: dict[str, float]  # p50, p95, p99, max, mean over successful requests
    batch_sizes: dict[str, dict] | None = None  # per model, when the target is batchserve

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(result: LoadResult, batch_sizes: dict[str, dict] | None = None) -> Summary:
    plan = result.plan
    latencies = np.array([o.latency for o in result.outcomes if o.ok], dtype=float) * 1000
    errors = collections.Counter(o.status for o in result.outcomes if not o.ok)
    return Summary(
        url=plan.url,
        mode=plan.mode,
        concurrency=plan.concurrency,
        rate=plan.rate,
        elapsed_s=result.elapsed,
        sent=len(result.outcomes),
        ok=len(latencies),
        errors=dict(sorted(errors.items())),
        throughput=throughput(result),
        latency_ms=latency_figures(latencies),
        batch_sizes=batch_sizes,
    )


def throughput(result: LoadResult) -> float:
    """Successful answers per second while load was offered.

    Counted over the run's window (``duration``, or less when the request count ran out
    first): answers that came in later, while the last requests drained, are left out,
    as they would lower the figure more for the slower servers.
    """
    window = min(result.plan.duration, result.elapsed)
    if window <= 0:
        return 0.0
    answered = sum(1 for o in result.outcomes if o.ok and o.due + o.latency <= window)
    return answered / window


def latency_figures(milliseconds: np.ndarray) -> dict[str, float]:
    if milliseconds.size == 0:
        return {}
    figures = {f"p{p}": float(np.percentile(milliseconds, p)) for p in PERCENTILES}
    figures["max"] = float(milliseconds.max())
    figures["mean"] = float(milliseconds.mean())
    return figures


def render(summary: Summary, console: Console) -> None:
    """The summary as rich tables."""
    load = f"{summary.concurrency} concurrent clients" if summary.mode == "closed" else f"{summary.rate:g} requests/s offered"
    table = Table(title=f"{summary.url} — {load}, {summary.elapsed_s:.1f} s", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("requests", f"{summary.sent} sent, {summary.ok} ok")
    table.add_row("throughput", f"{summary.throughput:.1f} req/s")
    for name, value in summary.latency_ms.items():
        table.add_row(f"latency {name}", f"{value:.1f} ms")
    errors = ", ".join(f"{status}: {count}" for status, count in summary.errors.items()) or "none"
    table.add_row("errors", errors)
    console.print(table)
    for model, sizes in (summary.batch_sizes or {}).items():
        console.print(_batch_table(model, sizes))


def _batch_table(model: str, sizes: dict) -> Table:
    table = Table(title=f"batches of {model}: {sizes['batches']} runs, mean size {sizes['mean']:.1f}")
    table.add_column("size", justify="right")
    table.add_column("batches", justify="right")
    table.add_column("")
    largest = max(sizes["distribution"].values(), default=0) or 1
    for label, count in sizes["distribution"].items():
        table.add_row(label, str(count), "█" * round(30 * count / largest))
    return table
