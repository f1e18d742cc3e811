"""The ``batchserve`` command line."""

from __future__ import annotations

from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Dynamic batching for model serving.")


@app.callback()
def main() -> None:
    """batchserve: serve models with dynamic batching."""


@app.command()
def serve(
    app_names: List[str] = typer.Option(
        None, "--app", help="built-in app: embeddings (default when no --model), or all"
    ),
    models: List[str] = typer.Option(
        None, "--model", help="your model as [name=]module:attr (a function or a class); repeatable"
    ),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network"),
    port: int = typer.Option(8000, help="port to bind"),
    max_batch_size: int = typer.Option(64, min=1, help="most items in one batch"),
    max_latency: float = typer.Option(0.01, min=0, help="longest batching wait, seconds from the oldest item"),
    max_queue_size: int = typer.Option(1024, min=1, help="queued items past which requests get 503"),
    timeout: float = typer.Option(30.0, min=0.001, help="default per-request deadline, seconds"),
    max_body_bytes: int = typer.Option(1_000_000, min=1, help="larger request bodies get 413"),
    backend: str = typer.Option("thread", help="where batches run: thread"),
    no_docs: bool = typer.Option(False, "--no-docs", help="do not serve /docs and /openapi.json"),
    no_metrics: bool = typer.Option(False, "--no-metrics", help="do not serve /metrics"),
    log_level: str = typer.Option("warning", help="debug, info, warning or error"),
) -> None:
    """Serve models over HTTP."""
    from batchserve.server.settings import Settings

    settings = Settings(
        apps=list(app_names or ([] if models else ["embeddings"])),
        models=list(models or []),
        host=host,
        port=port,
        max_batch_size=max_batch_size,
        max_latency=max_latency,
        max_queue_size=max_queue_size,
        timeout=timeout,
        max_body_bytes=max_body_bytes,
        backend=backend,
        docs=not no_docs,
        metrics=not no_metrics,
        log_level=log_level,
    )
    run_server(settings)


def run_server(settings) -> None:
    import uvicorn

    from batchserve.logs import configure_logging
    from batchserve.server.app import create_app

    log_config = configure_logging(settings.log_level)
    try:
        application = create_app(settings)
    except (ValueError, ImportError, AttributeError, TypeError) as error:
        typer.echo(f"batchserve: {error}", err=True)
        raise typer.Exit(2) from None
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        loop="auto",
        http="auto",
        log_config=log_config,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=15,
    )


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


if __name__ == "__main__":
    app()
