"""The ``batchserve`` command line."""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Dynamic batching for model serving.")

# options that `serve` and `worker` share, word for word
MAX_BATCH_SIZE = typer.Option(64, min=1, help="most items in one batch")
MAX_LATENCY = typer.Option(0.01, min=0, help="longest batching wait, seconds from the oldest item")
LOG_LEVEL = typer.Option("warning", help="debug, info, warning or error")


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """A bad --app, --model or setting: one line on stderr and exit status 2, no traceback."""
    try:
        yield
    except (ValueError, ImportError, AttributeError, TypeError) as error:
        typer.echo(f"batchserve: {error}", err=True)
        raise typer.Exit(2) from None


def model_settings(
    app_names: list[str] | None, models: list[str] | None, devices: list[str] | None, threads_per_worker: int, **rest
):
    """Settings from the options of `serve` and `worker`: embeddings when neither --app nor --model."""
    from batchserve.server.settings import Settings

    return Settings(
        apps=list(app_names or ([] if models else ["embeddings"])),
        models=list(models or []),
        devices=list(devices or ["cpu"]),
        threads_per_worker=threads_per_worker or None,
        **rest,
    )


@app.callback()
def main() -> None:
    """batchserve: serve models with dynamic batching."""


@app.command()
def serve(
    app_names: List[str] = typer.Option(
        None, "--app", help="built-in app: embeddings (default when no --model), generation, infill, or all"
    ),
    models: List[str] = typer.Option(
        None, "--model", help="your model as [name=]module:attr (a function or a class); repeatable"
    ),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network"),
    port: int = typer.Option(8000, help="port to bind"),
    max_batch_size: int = MAX_BATCH_SIZE,
    max_latency: float = MAX_LATENCY,
    max_queue_size: int = typer.Option(1024, min=1, help="queued items past which requests get 503"),
    timeout: float = typer.Option(30.0, min=0.001, help="default per-request deadline, seconds"),
    max_body_bytes: int = typer.Option(1_000_000, min=1, help="larger request bodies get 413"),
    backend: str = typer.Option("thread", help="where batches run: thread, process (worker processes) or redis"),
    workers: int = typer.Option(1, min=1, help="process backend: worker processes per model"),
    devices: List[str] = typer.Option(
        None, "--devices", help="process backend: cpu, or cuda:0,cuda:1 (round-robin over workers)"
    ),
    threads_per_worker: int = typer.Option(0, min=0, help="process backend: torch threads per worker (0: cores // workers)"),
    max_batches_per_worker: int = typer.Option(0, min=0, help="process backend: recycle a worker after N batches (0: never)"),
    http_workers: int = typer.Option(1, min=1, help="HTTP processes; more than 1 runs gunicorn (deploy/gunicorn.conf.py)"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help="redis backend: redis://[:password@]host:port/db"),
    prefix: str = typer.Option("", "--prefix", help="redis backend: key prefix, the same as the workers'"),
    drain_seconds: float = typer.Option(1.0, min=0, help="on SIGTERM: seconds /readyz answers 503 before closing"),
    grace: float = typer.Option(30.0, min=0, help="on shutdown: seconds in-flight requests may take"),
    generation_model: Optional[str] = typer.Option(
        None, "--generation-model", help="generation/infill: a causal-LM directory or .gguf (default: bundled SmolLM2)"
    ),
    generation_cache_dir: Optional[str] = typer.Option(
        None, "--generation-cache-dir", help="where the GGUF is dequantized once (default: ~/.cache/batchserve)"
    ),
    generation_max_rows: int = typer.Option(32, min=1, help="generation: sequences decoding together"),
    generation_threads: int = typer.Option(
        0, min=0, help="generation: torch threads for this process (0: torch's default, one per core)"
    ),
    no_docs: bool = typer.Option(False, "--no-docs", help="do not serve /docs and /openapi.json"),
    no_metrics: bool = typer.Option(False, "--no-metrics", help="do not serve /metrics"),
    log_level: str = LOG_LEVEL,
) -> None:
    """Serve models over HTTP."""
    settings = model_settings(
        app_names,
        models,
        devices,
        threads_per_worker,
        host=host,
        port=port,
        max_batch_size=max_batch_size,
        max_latency=max_latency,
        max_queue_size=max_queue_size,
        timeout=timeout,
        max_body_bytes=max_body_bytes,
        backend=backend,
        workers=workers,
        max_batches_per_worker=max_batches_per_worker or None,
        http_workers=http_workers,
        redis_url=redis_url,
        redis_prefix=prefix,
        drain_seconds=drain_seconds,
        grace=grace,
        generation_model=generation_model,
        generation_cache_dir=generation_cache_dir,
        generation_max_rows=generation_max_rows,
        generation_threads=generation_threads or None,
        docs=not no_docs,
        metrics=not no_metrics,
        log_level=log_level,
    )
    run_server(settings)


def run_server(settings) -> None:
    if settings.http_workers > 1:
        run_gunicorn(settings)
        return
    from batchserve.logs import configure_logging
    from batchserve.server.app import create_app
    from batchserve.server.run import serve as serve_until_drained

    log_config = configure_logging(settings.log_level)
    with exit_on_user_error():
        application = create_app(settings)
    serve_until_drained(application, settings, log_config)


def run_gunicorn(settings) -> None:
    """Several HTTP processes: replace this process with gunicorn (its master keeps our PID)."""
    import os
    import sys

    from batchserve.apps import build_services

    with exit_on_user_error():
        build_services(settings)  # fail here, with a clear message, on a bad --app or --model
    settings.to_env()
    command = [sys.executable, "-m", "gunicorn", "--config", "python:batchserve.server.gunicorn_config"]
    os.execv(sys.executable, command)


@app.command()
def bench(
    url: str = typer.Argument(..., help="server URL (the app's path is added) or a full endpoint URL"),
    app_name: str = typer.Option("embeddings", "--app", help="body template: embeddings, cluster, completions, autocomplete, infill, custom"),
    model: Optional[str] = typer.Option(None, "--model", help="model name for the custom template (/models/NAME/predict)"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", "-c", min=1, help="closed loop: clients sending back to back (default 1)"),
    rate: Optional[float] = typer.Option(None, "--rate", "-r", min=0.001, help="open loop: requests per second, whatever the server does"),
    duration: float = typer.Option(10.0, "--duration", "-d", min=0.001, help="stop sending after this many seconds"),
    requests: Optional[int] = typer.Option(None, "--requests", "-n", min=1, help="stop after this many requests"),
    items: int = typer.Option(1, min=1, help="texts per request"),
    timeout: float = typer.Option(30.0, min=0.001, help="per-request client timeout, seconds"),
    json_output: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout"),
) -> None:
    """Drive load against a server and report req/s, latency percentiles, errors and batch sizes."""
    import orjson
    from rich.console import Console

    from batchserve.bench import TEMPLATES, render, run_bench

    if app_name not in TEMPLATES:
        raise typer.BadParameter(f"choose one of {', '.join(TEMPLATES)}", param_hint="--app")
    if concurrency is not None and rate is not None:
        raise typer.BadParameter("give --concurrency or --rate, not both")
    progress_console = Console(stderr=True)
    try:
        summary = run_bench(
            url, app=app_name, model=model, items=items, concurrency=concurrency, rate=rate,
            duration=duration, requests=requests, timeout=timeout,
            console=progress_console if progress_console.is_terminal else None,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    if json_output:
        typer.echo(orjson.dumps(summary.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        render(summary, Console())
    if summary.ok == 0:
        raise typer.Exit(1)


@app.command()
def worker(
    redis_url: str = typer.Option(..., "--redis-url", help="redis://[:password@]host:port/db or rediss://"),
    app_names: List[str] = typer.Option(None, "--app", help="built-in app whose models to serve (default embeddings)"),
    models: List[str] = typer.Option(None, "--model", help="your model as [name=]module:attr, as given to serve"),
    prefix: str = typer.Option("", "--prefix", help="key prefix, the same as the fronts'"),
    workers: int = typer.Option(1, min=1, help="model processes on this host (more than 1: supervised processes)"),
    devices: List[str] = typer.Option(None, "--devices", help="cpu, or cuda:0,cuda:1 (round-robin over processes)"),
    threads_per_worker: int = typer.Option(0, min=0, help="torch threads per model process (0: cores // workers)"),
    max_batch_size: int = MAX_BATCH_SIZE,
    max_latency: float = MAX_LATENCY,
    visibility_timeout: float = typer.Option(10.0, min=0.1, help="seconds before a dead worker's requests are taken over"),
    log_level: str = LOG_LEVEL,
) -> None:
    """Serve models to `serve --backend redis` fronts through Redis: run it on each worker host."""
    from batchserve.backends.redis_worker import run_worker

    settings = model_settings(
        app_names,
        models,
        devices,
        threads_per_worker,
        max_batch_size=max_batch_size,
        max_latency=max_latency,
        max_queue_size=1_000_000,  # the stream is the queue; the worker reads only when it has room
        backend="process" if workers > 1 or devices or threads_per_worker else "thread",
        workers=workers,
        log_level=log_level,
    )
    with exit_on_user_error():
        run_worker(settings, redis_url, prefix=prefix, visibility_timeout=visibility_timeout)


if __name__ == "__main__":
    app()
