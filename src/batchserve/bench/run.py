"""One benchmark: scrape the target's batch sizes, drive the load with a progress bar, scrape again."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from batchserve.bench.bodies import request_bodies, request_path
from batchserve.bench.load import LoadPlan, run_load
from batchserve.bench.report import Summary, summarize
from batchserve.bench.scrape import batch_sizes_during, scrape_batch_sizes


def endpoint(url: str, app: str, model: str | None) -> tuple[str, str]:
    """``(request URL, server base URL)``: a bare server URL gets the app's path."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    base = f"{parts.scheme}://{parts.netloc}"
    path = parts.path if parts.path not in ("", "/") else request_path(app, model)
    return base + path, base


def run_bench(
    url: str,
    *,
    app: str = "embeddings",
    model: str | None = None,
    items: int = 1,
    concurrency: int | None = None,
    rate: float | None = None,
    duration: float = 10.0,
    requests: int | None = None,
    timeout: float = 30.0,
    console: Console | None = None,
) -> Summary:
    """Drive load against ``url`` and summarize it; ``console`` shows a progress bar."""
    target, base = endpoint(url, app, model)
    plan = LoadPlan(
        url=target,
        bodies=request_bodies(app, items),
        concurrency=concurrency if concurrency is not None or rate is not None else 1,
        rate=rate,
        duration=duration,
        requests=requests,
        timeout=timeout,
    )
    return _run(plan, base, console)


def _run(plan: LoadPlan, base: str, console: Console | None) -> Summary:
    try:
        import uvloop
    except ImportError:  # uvloop is optional: it only makes the generator cheaper
        return asyncio.run(_measure(plan, base, console))
    return uvloop.run(_measure(plan, base, console))


async def _measure(plan: LoadPlan, base: str, console: Console | None) -> Summary:
    async with httpx.AsyncClient() as client:
        before = await scrape_batch_sizes(client, base)
        with _ProgressBar(plan, console) as show:
            result = await run_load(plan, show)
        after = await scrape_batch_sizes(client, base)
    return summarize(result, batch_sizes_during(before, after))


class _ProgressBar:
    """A rich progress bar over the run's bound (time or request count), or nothing."""

    def __init__(self, plan: LoadPlan, console: Console | None):
        self.plan = plan
        self.progress = None
        if console is not None:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[answered]} answered"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )

    def __enter__(self):
        if self.progress is None:
            return None
        self.progress.start()
        load = f"c={self.plan.concurrency}" if self.plan.mode == "closed" else f"{self.plan.rate:g} req/s"
        self.task = self.progress.add_task(f"bench {load}", total=1.0, answered=0)
        return self.show

    def show(self, answered: int, elapsed: float) -> None:
        done = elapsed / self.plan.duration
        if self.plan.requests is not None:
            done = max(done, answered / self.plan.requests)
        self.progress.update(self.task, completed=min(done, 1.0), answered=answered)

    def __exit__(self, *exc_info) -> None:
        if self.progress is not None:
            self.progress.stop()
