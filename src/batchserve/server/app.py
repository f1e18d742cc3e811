"""The FastAPI app factory: services' routes, health, metrics, errors and limits.

Models load after the server starts listening (``/readyz`` answers 503 until they are).
If a service fails to start, the server cannot serve: :func:`_start_all` logs why and calls
``app.state.stop_serving(message)`` when the process runner set it (``batchserve serve``
on uvicorn, :mod:`batchserve.server.run`, and its gunicorn workers,
:mod:`batchserve.server.gunicorn_worker`): they stop and exit with status 3 and the message
on stderr.  Without a runner (the app mounted elsewhere, tests), ``/readyz`` stays 503 and
names the error.  Once every service has started, ``app.state.on_ready()`` is called when
the runner set it (it prints the "ready on URL" line).

Around everything, access control (:func:`_add_access_control`): CORS outermost, then API keys
(:mod:`batchserve.server.auth`), then the body limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import AsyncIterator, Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import batchserve
from batchserve.apps import build_services
from batchserve.apps.base import Service
from batchserve.server import auth, dashboard, model_list, pages, tokenize
from batchserve.server.batches import UPLOAD_PATH, add_batch_api, upload_limit
from batchserve.server.errors import ERROR_RESPONSES, install_error_handlers
from batchserve.server.json_response import FastJSONResponse
from batchserve.server.limits import BodyLimitMiddleware
from batchserve.server.metrics import Metrics, RequestMetricsMiddleware
from batchserve.settings import Settings

log = logging.getLogger("batchserve.server")


def create_app(settings: Settings | None = None, services: Iterable[Service] | None = None) -> FastAPI:
    """Build the app.  Models load after the server starts listening; ``/readyz`` says when."""
    settings = settings or Settings()
    keys = auth.load_keys(settings.server)  # a missing or empty key file: refused before any model loads
    services = list(services) if services is not None else build_services(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(
            _start_all(services, lambda message: _cannot_serve(app, message), lambda: _ready(app))
        )
        app.state.loading = loading
        if batches is not None:
            batches.start()
        try:
            yield
        finally:
            if batches is not None:  # its requests in flight finish first, within the grace
                await batches.close(settings.server.grace)
            loading.cancel()
            await asyncio.gather(*(s.close(settings.server.grace) for s in services), return_exceptions=True)

    app = FastAPI(
        title="batchserve",
        version=batchserve.__version__,
        lifespan=lifespan,
        default_response_class=FastJSONResponse,
        docs_url=None,  # pages.add_pages serves /docs, with Swagger UI's files from here rather than a CDN
        redoc_url=None,
        openapi_url="/openapi.json" if settings.server.docs else None,
        # FastAPI's own OpenTelemetry instrumentation asks the global providers on every request
        # (about 5 % of the server's CPU per request); batchserve's metrics are Prometheus (/metrics)
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.settings = settings
    app.state.services = services
    app.state.draining = False
    app.state.stop_serving = None  # set by the process runner: Callable[[str], None]
    app.state.on_ready = None  # set by the process runner: Callable[[], None]
    install_error_handlers(app)
    for service in services:
        app.include_router(service.router, responses=ERROR_RESPONSES)
    app.include_router(model_list.build_router(services))
    if any(service.tokenizes for service in services):
        app.include_router(tokenize.build_router(services), responses=ERROR_RESPONSES)
    _add_health_routes(app, services)
    batches = add_batch_api(app, settings, services, lambda: _started(app, services)) if settings.server.batch_api else None
    larger = {UPLOAD_PATH: upload_limit(settings)} if batches is not None else {}
    pages.add_pages(app, services, docs=settings.server.docs, metrics=settings.server.metrics)
    refused = None
    if settings.server.metrics:
        batchers = lambda: [b for s in services for b in s.batchers.values()]  # noqa: E731
        metrics = Metrics(batchers)
        for collector in {id(c): c for s in services for c in s.collectors}.values():
            metrics.registry.register(collector)  # engines that are not batchers (generation)
        app.state.errors_total = metrics.errors_total
        refused = auth.refused_counter(metrics.registry) if keys else None
        _add_metrics_route(app, metrics)
        app.include_router(dashboard.build_router(metrics, batchers))
        app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.server.max_body_bytes, larger=larger)
    _add_access_control(app, settings, keys, refused)
    return app


def _add_access_control(app: FastAPI, settings: Settings, keys: list[str], refused) -> None:
    """API keys (outside the body limit: a request without a key is refused before its body is
    read), then CORS outside them (a browser's preflight carries no key)."""
    app.add_api_route(auth.KEY_SCRIPT_PATH, auth.key_script, methods=["GET"], include_in_schema=False)
    if keys:
        app.add_middleware(auth.ApiKeyMiddleware, keys=keys, public=auth.public_paths(settings.server), refused=refused)
        log.info("API keys: %d accepted; public without one: %s", len(keys), ", ".join(sorted(auth.public_paths(settings.server))))
    origins = settings.server.cors_origins
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],  # Authorization, Content-Type, X-Request-Timeout...
            expose_headers=["Retry-After", "WWW-Authenticate"],
            max_age=600,
        )


def create_app_from_env() -> FastAPI:
    """Factory for gunicorn/uvicorn ``--factory``: settings come from ``BATCHSERVE_CONFIG``'s
    file and ``BATCHSERVE_SETTINGS`` (:func:`batchserve.config.from_environment`)."""
    from batchserve.config import from_environment_or_exit

    return create_app(from_environment_or_exit())


def create_preloaded_app() -> FastAPI:
    """Factory for the gunicorn master (``preload_app``): load the models here, before the fork.

    The HTTP workers forked from this process share the weights copy-on-write; each still
    starts its own batchers when it starts serving.
    """
    from batchserve.config import from_environment_or_exit
    from batchserve.logs import configure_logging

    settings = from_environment_or_exit()
    configure_logging(settings.server.log_level.value)
    app = create_app(settings)
    for service in app.state.services:
        try:
            service.preload()
        except Exception as error:  # the master exits before any worker is forked
            message = f"service {service.name} failed to load: {type(error).__name__}: {error}"
            log.error("%s", message)
            print(f"batchserve: cannot serve: {message}", file=sys.stderr, flush=True)
            raise SystemExit(CANNOT_SERVE) from None
    return app


#: exit status of a server that could not start serving (uvicorn's and gunicorn's own)
CANNOT_SERVE = 3


async def _start_all(
    services: list[Service], cannot_serve: Callable[[str], None], ready: Callable[[], None] = lambda: None
) -> None:
    async def start(service: Service) -> None:
        try:
            await service.start()
        except Exception as error:
            service.error = f"{type(error).__name__}: {error}"
            log.error("service %s failed to start: %s", service.name, service.error)

    await asyncio.gather(*(start(service) for service in services))
    failed = [service for service in services if service.error]
    if failed:
        cannot_serve("; ".join(f"service {service.name} failed to start: {service.error}" for service in failed))
        return
    log.info("ready: %s", ", ".join(service.name for service in services))
    ready()


async def _started(app: FastAPI, services: list[Service]) -> bool:
    """Once the models have loaded: whether every service started."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(app.state.loading)
    return app.state.loading.done() and not any(service.error for service in services)


def _ready(app: FastAPI) -> None:
    on_ready = app.state.on_ready
    if on_ready is not None:
        on_ready()


def _cannot_serve(app: FastAPI, message: str) -> None:
    stop_serving = app.state.stop_serving
    if stop_serving is not None:
        stop_serving(message)


def _add_health_routes(app: FastAPI, services: list[Service]) -> None:
    @app.get("/healthz", tags=["health"], summary="The process is alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Every model is loaded and has a worker up")
    async def readyz(request: Request):
        draining = request.app.state.draining
        ready = not draining and all(service.ready() for service in services)
        body = {"ready": ready, "draining": draining, "services": {s.name: s.describe() for s in services}}
        return FastJSONResponse(body, status_code=200 if ready else 503)


def _add_metrics_route(app: FastAPI, metrics: Metrics) -> None:
    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", include_in_schema=False)
    async def prometheus(request: Request):
        await metrics.backlog.refresh()
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
