"""What a person meets first: the index page at ``/``, ``/docs`` that works offline, a 404 that
says which ``--app`` serves a route, and the line that says the server is ready.

* ``GET /`` — a small page linking each loaded app's routes and pages, ``/docs`` and
  ``/dashboard`` (when no app has a page of its own there: the generation app's editor is
  ``/``);
* ``GET /docs`` — Swagger UI from files served here (``/docs/assets/...``, shipped by the
  ``fastapi-offline`` package), not from a CDN, so it shows without internet access;
* (:mod:`batchserve.server.errors`: a route of a built-in app this server was not started
  with answers 404 naming the ``--app`` that serves it, not a bare "Not Found";)
* :func:`announce_ready` prints one line with the server's URL once every app is ready.
"""

from __future__ import annotations

import html
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from batchserve.apps.base import Service
from batchserve.settings import ServerSettings

#: the Swagger UI files ``/docs`` loads, served from the ``fastapi-offline`` package
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}
DOCS_ASSETS_PATH = "/docs/assets"


def add_pages(app: FastAPI, services: list[Service], docs: bool, metrics: bool) -> None:
    """The index page (unless an app serves ``/``) and, with ``docs``, the offline ``/docs``."""
    if docs:
        _add_docs(app)
    if not any(getattr(route, "path", None) == "/" for service in services for route in service.router.routes):
        page = index_page(services, docs=docs, metrics=metrics)

        @app.get("/", include_in_schema=False)
        async def index():
            return HTMLResponse(page)


def _add_docs(app: FastAPI) -> None:
    assets = _docs_assets_dir()

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            swagger_js_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_PATH}/favicon.png",
        )


    @app.get(DOCS_ASSETS_PATH + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in DOCS_ASSETS:
            return Response(status_code=404)
        return FileResponse(assets / name, media_type=DOCS_ASSETS[name], headers={"Cache-Control": "max-age=86400"})


def _docs_assets_dir() -> Path:
    """Where ``fastapi-offline`` keeps Swagger UI's files (it comes with the ``server`` extra)."""
    from batchserve.extras import needs_extra

    with needs_extra("server", "the offline /docs page"):
        import fastapi_offline  # noqa: F401  (only its files are used)
    return Path(resources.files("fastapi_offline")) / "static"


def index_page(services: Iterable[Service], docs: bool, metrics: bool) -> str:
    """The HTML of ``/``: each app with its routes (a page is a link), then the server's own pages."""
    sections = []
    for service in services:
        rows = []
        for route in service.router.routes:
            path, methods = getattr(route, "path", None), sorted(getattr(route, "methods", None) or ())
            if path is None or not methods:
                continue
            shown = html.escape(path)
            if "GET" in methods and "{" not in path:
                shown = f'<a href="{shown}">{shown}</a>'
            summary = html.escape(getattr(route, "summary", None) or "")
            rows.append(f"<li><code>{' '.join(methods)}</code> {shown} {summary}</li>")
        sections.append(f"<h2>{html.escape(service.name)}</h2><ul>{''.join(rows)}</ul>")
    own = []
    if docs:
        own.append('<li><a href="/docs">/docs</a> every route, to read and to try</li>')
    if metrics:
        own.append('<li><a href="/dashboard">/dashboard</a> queue, batches, latency and errors, live</li>')
        own.append('<li><a href="/metrics">/metrics</a> Prometheus metrics</li>')
    own.append('<li><a href="/readyz">/readyz</a> whether every model is loaded</li>')
    own.append('<li><a href="/v1/models">/v1/models</a> the models served</li>')
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>batchserve</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:46em;margin:2em auto;padding:0 1em}"
        "code{color:#555}li{margin:.2em 0}</style></head><body>"
        f"<h1>batchserve</h1>{''.join(sections)}<h2>this server</h2><ul>{''.join(own)}</ul></body></html>"
    )


def server_url(server: ServerSettings) -> str:
    """The URL to open: the host it listens on (loopback for every interface), its port."""
    scheme = "https" if getattr(server, "ssl_certfile", None) else "http"
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(server.host, server.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{server.port}"


def announce(message: str) -> None:
    """One plain line on stderr (among the JSON log lines): for the person who started the server."""
    print(f"batchserve: {message}", file=sys.stderr, flush=True)


def announce_listening(server: ServerSettings, names: Iterable[str]) -> None:
    announce(f"listening on {server_url(server)}; loading {', '.join(names) or 'nothing'} (GET /readyz answers 200 once ready)")


def announce_ready(server: ServerSettings, names: Iterable[str]) -> None:
    announce(f"ready on {server_url(server)} ({', '.join(names) or 'nothing'})")
