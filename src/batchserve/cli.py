"""The ``batchserve`` command line.

Options that set a server or worker setting are built by :func:`option` from the field in
:mod:`batchserve.settings`: its default, bounds and help live there only.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING, Any, Iterator, List, Optional

import typer
from annotated_types import Ge, Le

from batchserve.config import CONFIG_ENV
from batchserve.extras import needs_extra
from batchserve.settings import (
    API_KEY_ENV,
    AppName,
    BackendKind,
    EncoderRuntimeName,
    LanguageModelRuntimeName,
    LogLevel,
    Quantization,
    Settings,
    SettingsError,
    field_info,
)

if TYPE_CHECKING:
    from batchserve.config import Effective

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="Dynamic batching for model serving."
)


def option(
    name: str, *flags: str, help: str | None = None, show_default: bool | str = True, envvar: str | None = None
) -> Any:
    """A typer option for the setting ``name``: default, bounds and help from its field.

    List settings and settings whose default is computed get ``None`` (meaning "the
    setting's default") so that the help shows the real default and no value is restated.
    """
    field = field_info(name)
    bounds: dict[str, float] = {}  # strict bounds (gt) are left to the settings' own validation
    for constraint in field.metadata:
        if isinstance(constraint, Ge):
            bounds["min"] = constraint.ge
        elif isinstance(constraint, Le):
            bounds["max"] = constraint.le
    default, shown = field.default, show_default
    if field.default_factory is not None:
        default = None
        if show_default is True:
            shown = ", ".join(map(str, field.default_factory()))
    return typer.Option(default, *flags, help=help or field.description, show_default=shown, envvar=envvar, **bounds)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """What the user caused: one line on stderr and exit status 2, no traceback.

    That is a value refused (``ValueError``: settings, devices, files named by a flag, and
    :class:`~batchserve.errors.ConfigError`, which a ``--model`` that cannot be imported or
    used becomes) or a missing extra.  Anything else (a ``TypeError``, an ``AttributeError``,
    an ``ImportError`` of batchserve's own) is a bug, and keeps its traceback.
    """
    from batchserve.extras import MissingExtraError

    try:
        yield
    except (ValueError, MissingExtraError) as error:
        typer.echo(f"batchserve: {error}", err=True)
        raise typer.Exit(2) from None


def settings_from(ctx: typer.Context | None = None, config: str | None = None, **options: Any) -> Settings:
    """Settings from the config file ``config`` (None: none) and the command's options over it;
    a value refused exits with status 2 and its path (:func:`effective_settings`)."""
    return effective_settings(ctx, config, options).settings


def effective_settings(ctx: typer.Context | None, config: str | None, options: dict[str, Any]) -> "Effective":
    """The settings of the file ``config`` and, over it, the options of the running command
    (``ctx``) that were given, on the command line or by their environment variable (a
    default never hides the file's value); without ``ctx``, or for a name that is not one of
    its options, every option given counts.  A problem (unknown key, bad value, bad YAML,
    missing file) exits with status 2 and one line naming its path, never a traceback."""
    from pydantic import ValidationError

    from batchserve.config import ENV, FLAG, effective

    params = {param.name: param for param in ctx.command.params} if ctx is not None else {}
    given: dict[str, Any] = {}
    sources: dict[str, str] = {}
    spelled: dict[str, str] = {}
    for name, value in options.items():
        param = params.get(name)
        source = ctx.get_parameter_source(name).name if param is not None else "COMMANDLINE"
        if source == "COMMANDLINE":
            sources[name], spelled[name] = FLAG, param.opts[0] if param is not None else name
        elif source == "ENVIRONMENT":
            envvar = param.envvar if isinstance(param.envvar, str) else (param.envvar or [name])[0]
            sources[name], spelled[name] = ENV, envvar
        else:  # the default: the file's value, or the setting's own default
            continue
        given[name] = value
    try:
        return effective(config, given, sources, spelled)
    except (SettingsError, ValidationError) as error:
        typer.echo(f"batchserve: {_one_line(error)}", err=True)
        raise typer.Exit(2) from None


def _one_line(error: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return str(error)


def config_option() -> Any:
    return typer.Option(
        None, "--config", envvar=CONFIG_ENV, show_default=False,
        help="YAML file of settings: the same names as these options, plus each app's and model's own "
        "batching (apps:, models:); options given here override it",
    )


@app.callback()
def main() -> None:
    """batchserve: serve models with dynamic batching."""


@app.command()
def serve(
    ctx: typer.Context,
    config: Optional[str] = config_option(),
    apps: List[AppName] = option("apps", "--app", help="built-in app (embeddings when no --model); repeatable", show_default="embeddings"),
    models: List[str] = option("models", "--model", show_default=False),
    host: str = option("host"),
    port: int = option("port"),
    max_batch_size: int = option("max_batch_size"),
    max_latency: float = option("max_latency"),
    max_queue_size: int = option("max_queue_size"),
    max_batch_tokens: Optional[int] = option("max_batch_tokens"),
    timeout: float = option("timeout"),
    max_timeout: float = option("max_timeout"),
    max_body_bytes: int = option("max_body_bytes"),
    backend: Optional[BackendKind] = option("backend"),
    workers: int = option("workers"),
    devices: List[str] = option("devices", "--devices"),
    threads_per_worker: Optional[int] = option("threads_per_worker"),
    max_batches_per_worker: Optional[int] = option("max_batches_per_worker"),
    http_workers: int = option("http_workers"),
    redis_url: Optional[str] = option("redis_url", "--redis-url"),
    redis_prefix: str = option("redis_prefix", "--prefix"),
    redis_ca_file: Optional[str] = option("redis_ca_file"),
    redis_certfile: Optional[str] = option("redis_certfile"),
    redis_keyfile: Optional[str] = option("redis_keyfile"),
    wait_for_workers: bool = option("wait_for_workers", "--wait-for-workers/--no-wait-for-workers"),
    drain_seconds: float = option("drain_seconds"),
    grace: float = option("grace"),
    runtime: EncoderRuntimeName = option("runtime"),
    quantize: Quantization = option("quantize"),
    generation_model: Optional[str] = option("generation_model"),
    generation_cache_dir: Optional[str] = option("generation_cache_dir"),
    generation_max_rows: int = option("generation_max_rows"),
    generation_threads: Optional[int] = option("generation_threads"),
    generation_runtime: LanguageModelRuntimeName = option("generation_runtime"),
    generation_prefix_cache_tokens: int = option("generation_prefix_cache_tokens"),
    docs: bool = option("docs", "--docs/--no-docs"),
    metrics: bool = option("metrics", "--metrics/--no-metrics"),
    log_level: LogLevel = option("log_level"),
    api_keys: List[str] = option("api_keys", "--api-key", envvar=API_KEY_ENV, show_default=False),
    api_key_file: Optional[str] = option("api_key_file"),
    public_metrics: bool = option("public_metrics", "--public-metrics/--no-public-metrics"),
    ssl_certfile: Optional[str] = option("ssl_certfile"),
    ssl_keyfile: Optional[str] = option("ssl_keyfile"),
    ssl_ca_certs: Optional[str] = option("ssl_ca_certs"),
    cors_origins: List[str] = option("cors_origins", "--cors-origins", show_default=False),
    batch_api: bool = option("batch_api", "--batch-api/--no-batch-api"),
    batch_dir: Optional[str] = option("batch_dir"),
    batch_max_file_bytes: int = option("batch_max_file_bytes"),
    batch_max_files: int = option("batch_max_files"),
    batch_max_lines: int = option("batch_max_lines"),
    batch_max_pending: int = option("batch_max_pending"),
    batch_in_flight: int = option("batch_in_flight"),
) -> None:
    """Serve models over HTTP."""
    run_server(settings_from(**locals()))


def check_devices(settings: Settings) -> None:
    """A device that does not exist here is refused before any worker starts (exit status 2)."""
    from batchserve.devices import check_devices as check

    with exit_on_user_error():
        check(settings.process.devices)


def check_front_door(settings: Settings) -> None:
    """The API key file and the TLS files load, or the server is refused before any model loads (exit status 2)."""
    from batchserve.server.auth import load_keys
    from batchserve.server.run import check_tls

    with exit_on_user_error():
        load_keys(settings.server)
        check_tls(settings.server)


def run_server(settings: Settings) -> None:
    check_devices(settings)
    check_front_door(settings)
    if settings.server.http_workers > 1:
        run_gunicorn(settings)
        return
    from batchserve.logs import configure_logging
    from batchserve.server.app import create_app
    from batchserve.server.run import serve as serve_until_drained

    log_config = configure_logging(settings.server.log_level.value)
    with exit_on_user_error():
        application = create_app(settings)
    serve_until_drained(application, settings, log_config)


def run_gunicorn(settings: Settings) -> None:
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
    app_name: str = typer.Option(
        "embeddings", "--app", help="body template: embeddings, cluster, completions, autocomplete, infill, custom"
    ),
    model: Optional[str] = typer.Option(None, "--model", help="model name for the custom template (/models/NAME/predict)"),
    concurrency: Optional[int] = typer.Option(
        None, "--concurrency", "-c", min=1, help="closed loop: clients sending back to back (default 1)"
    ),
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

    with exit_on_user_error(), needs_extra("bench", "batchserve bench"):
        from batchserve.bench import TEMPLATES, NotServedError, render, run_bench

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
    except NotServedError as error:  # the server's own answer: what it serves, not a bad option
        typer.echo(f"batchserve bench: {error}", err=True)
        raise typer.Exit(2) from None
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    if json_output:
        typer.echo(orjson.dumps(summary.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        render(summary, Console())
    if summary.ok == 0:
        raise typer.Exit(1)


#: a worker reads from the stream only when its batcher has room: the stream is the queue
WORKER_QUEUE_SIZE = 1_000_000


@app.command()
def worker(
    ctx: typer.Context,
    config: Optional[str] = config_option(),
    redis_url: Optional[str] = option("redis_url", "--redis-url"),
    apps: List[AppName] = option("apps", "--app", help="built-in app whose models to serve; repeatable", show_default="embeddings"),
    models: List[str] = option("models", "--model", help="your model as [name=]module:attr, as given to serve", show_default=False),
    redis_prefix: str = option("redis_prefix", "--prefix"),
    redis_ca_file: Optional[str] = option("redis_ca_file"),
    redis_certfile: Optional[str] = option("redis_certfile"),
    redis_keyfile: Optional[str] = option("redis_keyfile"),
    workers: int = option("workers", help="model processes on this host (more than 1: supervised processes)"),
    devices: List[str] = option("devices", "--devices", help="cpu, or cuda:0,cuda:1 (round-robin over processes)"),
    threads_per_worker: Optional[int] = option(
        "threads_per_worker", help="threads of each model process, every runtime (default: cores // workers)"
    ),
    max_batch_size: int = option("max_batch_size"),
    max_latency: float = option("max_latency"),
    max_batch_tokens: Optional[int] = option("max_batch_tokens"),
    runtime: EncoderRuntimeName = option("runtime"),
    quantize: Quantization = option("quantize"),
    visibility_timeout: float = option("visibility_timeout"),
    log_level: LogLevel = option("log_level"),
) -> None:
    """Serve models to `serve --backend redis` fronts through Redis: run it on each worker host."""
    options = dict(locals())
    from batchserve.apps import batched_models, with_app_settings

    with exit_on_user_error(), needs_extra("redis", "batchserve worker"):
        from batchserve.backends.redis.worker import run_worker

    found = effective_settings(options.pop("ctx"), options.pop("config"), options)
    if not found.settings.redis.redis_url:
        typer.echo("batchserve: a worker needs --redis-url (or redis_url in its config file)", err=True)
        raise typer.Exit(2)
    with exit_on_user_error():
        settings = worker_settings(with_app_settings(found.settings), devices_given=found.source("devices") != "default")
    check_devices(settings)
    with exit_on_user_error():
        run_worker(settings, batched_models(settings))


def worker_settings(settings: Settings, devices_given: bool = False) -> Settings:
    """What ``batchserve worker`` runs with, from its flags and config file (the fronts' own
    file will do): the Redis stream is each batcher's queue (:data:`WORKER_QUEUE_SIZE`; a
    model's own ``max_queue_size`` bounds the fronts, not this), and every model runs here, on
    worker processes when it is given several workers, devices or a thread count, else on a
    thread (a ``backend: redis`` is the fronts' setting)."""
    from batchserve.settings import ModelSettings

    local = (BackendKind.thread, BackendKind.process)

    def placed(workers: int | None, devices: bool, threads: int | None) -> BackendKind:
        return BackendKind.process if (workers or 1) > 1 or devices or threads is not None else BackendKind.thread

    process = settings.process
    backend = settings.backend if settings.backend in local else placed(process.workers, devices_given, process.threads_per_worker)
    own: dict[str, ModelSettings] = {}
    for name, entry in settings.model_settings.items():
        given = entry.model_dump(exclude_none=True)
        given.pop("max_queue_size", None)
        if given.get("backend") not in local:
            given.pop("backend", None)
            if {"workers", "devices", "threads_per_worker"} & set(given):
                given["backend"] = placed(
                    given.get("workers", process.workers), "devices" in given or devices_given,
                    given.get("threads_per_worker", process.threads_per_worker),
                )
        own[name] = ModelSettings(**given)
    batching = settings.batching.model_copy(update={"max_queue_size": WORKER_QUEUE_SIZE})
    return settings.model_copy(update={"backend": backend, "batching": batching, "model_settings": own})


@app.command("run-batch")
def run_batch(
    ctx: typer.Context,
    input_file: str = typer.Option(..., "--input", "-i", help="the job: a JSONL file in OpenAI's batch format, one request a line"),
    output_file: str = typer.Option(
        ..., "--output", "-o", help="answered lines (2xx) are appended here; a rerun skips the custom_ids already in it"
    ),
    errors_file: Optional[str] = typer.Option(
        None, "--errors", help="lines the route refused or that could not run", show_default="OUT.errors.jsonl"
    ),
    window: int = typer.Option(1024, "--window", min=1, help="lines read ahead and sorted by length together"),
    in_flight: int = typer.Option(256, "--in-flight", min=1, help="requests in the batchers at once"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress and no summary (errors still on stderr)"),
    log_every: float = typer.Option(
        10.0, "--log-every", min=0.1, help="seconds between progress lines when stderr is not a terminal"
    ),
    config: Optional[str] = config_option(),
    apps: List[AppName] = option("apps", "--app", help="built-in app (embeddings when no --model); repeatable", show_default="embeddings"),
    models: List[str] = option("models", "--model", show_default=False),
    max_batch_size: int = option("max_batch_size"),
    max_latency: float = option("max_latency"),
    max_queue_size: int = option("max_queue_size"),
    max_batch_tokens: Optional[int] = option("max_batch_tokens"),
    max_timeout: float = option("max_timeout", help="longest a line may take, retries of a full queue included, seconds"),
    max_body_bytes: int = option("max_body_bytes"),
    backend: Optional[BackendKind] = option("backend"),
    workers: int = option("workers"),
    devices: List[str] = option("devices", "--devices"),
    threads_per_worker: Optional[int] = option("threads_per_worker"),
    max_batches_per_worker: Optional[int] = option("max_batches_per_worker"),
    redis_url: Optional[str] = option("redis_url", "--redis-url"),
    redis_prefix: str = option("redis_prefix", "--prefix"),
    redis_ca_file: Optional[str] = option("redis_ca_file"),
    redis_certfile: Optional[str] = option("redis_certfile"),
    redis_keyfile: Optional[str] = option("redis_keyfile"),
    runtime: EncoderRuntimeName = option("runtime"),
    quantize: Quantization = option("quantize"),
    generation_model: Optional[str] = option("generation_model"),
    generation_cache_dir: Optional[str] = option("generation_cache_dir"),
    generation_max_rows: int = option("generation_max_rows"),
    generation_threads: Optional[int] = option("generation_threads"),
    generation_runtime: LanguageModelRuntimeName = option("generation_runtime"),
    generation_prefix_cache_tokens: int = option("generation_prefix_cache_tokens"),
    log_level: LogLevel = option("log_level"),
) -> None:
    """Run a file of requests (OpenAI's batch format) through the models, with the settings and
    config file of `serve`, in this process: resumable, with progress.  Exit 0 when every line
    was answered or reported."""
    options = dict(locals())
    from pathlib import Path

    from batchserve.batchjob.runner import JobError, JobOptions, errors_path, run_job
    from batchserve.logs import configure_logging
    from batchserve.server.app import create_app

    job = {name: options.pop(name) for name in ("input_file", "output_file", "errors_file", "window", "in_flight", "quiet", "log_every")}
    settings = settings_from(options.pop("ctx"), options.pop("config"), **options)
    check_devices(settings)
    output = Path(job["output_file"])
    job_options = JobOptions(
        input=Path(job["input_file"]), output=output,
        errors=Path(job["errors_file"]) if job["errors_file"] else errors_path(output),
        window=job["window"], in_flight=job["in_flight"], quiet=job["quiet"], log_every=job["log_every"],
    )
    configure_logging(settings.server.log_level.value)
    try:
        with exit_on_user_error():
            status = run_job(settings, job_options, create_app)
    except JobError as error:
        typer.echo(f"batchserve run-batch: {error}", err=True)
        raise typer.Exit(error.status) from None
    except KeyboardInterrupt:  # Ctrl-C while the models load: no line ran
        typer.echo("batchserve run-batch: interrupted while loading the models; no line was run", err=True)
        raise typer.Exit(130) from None
    if status:
        raise typer.Exit(status)


def _with_serve_options(command: Any) -> Any:
    """``command`` taking every option of ``serve`` too (typer reads the signature)."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*inspect.signature(serve, eval_str=True).parameters.values(), *own])
    return command


@app.command("config")
@_with_serve_options
def show_config(
    json_output: bool = typer.Option(False, "--json", help="print JSON: the settings, and where each came from"),
    **options: Any,
) -> None:
    """Print the settings `serve` would run with (its options, --config too) and where each
    came from: flag, env (an option's variable), file or default.  Starts nothing."""
    import json

    found = effective_settings(options.pop("ctx"), options.pop("config"), options)
    rows = found.rows()
    if json_output:
        typer.echo(json.dumps(
            {"settings": found.settings.model_dump(mode="json"), "sources": {path: source for path, _, source in rows}},
            indent=2,
        ))
        return
    shown = [(path, json.dumps(value), source) for path, value, source in rows]
    width = max(len(path) for path, _, _ in shown)
    values = min(max(len(value) for _, value, _ in shown), 40)
    typer.echo("# the settings `batchserve serve` would run with (flag > env > file > default)")
    for path, value, source in shown:
        typer.echo(f"{path:<{width}}  {value:<{values}}  {source}")


if __name__ == "__main__":
    app()
