"""One benchmark: check the target serves the path, scrape its batch sizes, drive the load with a
progress bar, scrape again."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from batchserve.bench.bodies import TEMPLATES, request_bodies, request_path
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
        await check_served(client, plan, base)
        before = await scrape_batch_sizes(client, base)
        with _ProgressBar(plan, console) as show:
            result = await run_load(plan, show)
        after = await scrape_batch_sizes(client, base)
    return summarize(result, batch_sizes_during(before, after))


class NotServedError(ValueError):
    """The target answered 404 or 405 to the first request: the server does not serve that path."""


async def check_served(client: httpx.AsyncClient, plan: LoadPlan, base: str) -> None:
    """Send one request before the load: a path the server does not serve fails now, naming
    the path and what the server serves, rather than after a whole run of 404s."""
    headers = {"content-type": "application/json", **plan.headers}
    try:
        response = await client.post(plan.url, content=plan.bodies[0], headers=headers, timeout=plan.timeout)
    except httpx.HTTPError:
        return  # unreachable or slow: the run itself counts and reports it
    if response.status_code not in (404, 405):
        return
    routes = await _served_routes(client, base)
    models = await _listed(client, f"{base}/v1/models", lambda body: [card["id"] for card in body["data"]])
    user_models = await _listed(client, f"{base}/models", lambda body: body["models"])  # --model ones
    path = urlsplit(plan.url).path
    lines = [f"POST {path} answered {response.status_code}: {_server_says(response)}"]
    if routes is None:
        lines.append(f"The server publishes no route list ({base}/openapi.json: off or not batchserve).")
    else:
        lines.append("It serves POST " + (", ".join(routes) or "nothing") + ".")
    if models:
        lines.append("Its models (GET /v1/models): " + ", ".join(models) + ".")
    choices = _templates_for(routes or [], user_models)
    if choices:
        lines.append("Send what it serves with " + " or ".join(choices) + " (or give the full endpoint URL).")
    else:
        lines.append("Pick the body template with --app (" + ", ".join(TEMPLATES) + "), or give the full endpoint URL.")
    raise NotServedError("\n".join(lines))


async def _served_routes(client: httpx.AsyncClient, base: str) -> list[str] | None:
    """The POST paths of the server's OpenAPI document a load could target; None without one."""
    try:
        response = await client.get(f"{base}/openapi.json", timeout=10)
        paths = response.json()["paths"] if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(paths, dict):
        return None
    return [path for path, operations in paths.items() if isinstance(operations, dict) and _load_target(operations.get("post"))]


def _load_target(operation: object) -> bool:
    """A POST operation a load could be aimed at: not the Batch API's (tagged ``batch``: file
    uploads and job control, docs/batch.md)."""
    return isinstance(operation, dict) and "batch" not in operation.get("tags", [])


async def _listed(client: httpx.AsyncClient, url: str, names) -> list[str]:
    """The names ``names(body)`` reads from the JSON answer to ``GET url``; none on any failure."""
    try:
        response = await client.get(url, timeout=10)
        return [str(name) for name in names(response.json())] if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []


def _server_says(response: httpx.Response) -> str:
    """The error message of a JSON error body (FastAPI's or OpenAI's shape), else its text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:200]


def _templates_for(routes: list[str], models: list[str]) -> list[str]:
    """The ``--app`` choices (with ``--model`` for a user's model) whose path the server serves."""
    choices = []
    for name, template in TEMPLATES.items():
        if "{model}" not in template.path:
            if template.path in routes:
                choices.append(f"--app {name}")
        elif template.path.replace("{model}", "{name}") in routes:
            choices += [f"--app {name} --model {model}" for model in models] or [f"--app {name} --model NAME"]
    return choices


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
