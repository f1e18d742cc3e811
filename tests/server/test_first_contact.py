"""What a new user meets first: the ready line, the index page at /, /docs offline, and a 404
that names the --app serving a route this server was not started with."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi import APIRouter

from batchserve.apps import build_services
from batchserve.apps.base import Service
from batchserve.apps.routes import APP_ROUTES, MODEL_ROUTES, SHARED_ROUTES, who_serves
from batchserve.server.app import create_app
from batchserve.settings import Settings
from tests.conftest import ServerProcess, terminate


async def test_the_index_page_links_the_apps_routes_docs_and_dashboard(serve_app):
    client = await serve_app(models=["tests.fakes:echo"])
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    links = set(re.findall(r'href="([^"]+)"', page.text))
    assert {"/docs", "/dashboard", "/metrics", "/readyz", "/v1/models", "/models"} <= links
    assert "/models/{name}/predict" in page.text and "POST" in page.text
    for link in links:
        assert (await client.get(link)).status_code == 200, link

    bare = await serve_app(models=["tests.fakes:echo"], docs=False, metrics=False)
    links = set(re.findall(r'href="([^"]+)"', (await bare.get("/")).text))
    assert "/docs" not in links and "/dashboard" not in links


async def test_an_app_with_a_page_at_the_root_keeps_it():
    router = APIRouter()

    @router.get("/")
    async def editor():
        return {"page": "the editor"}

    app = create_app(Settings(), services=[Service("editor", router)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/")).json() == {"page": "the editor"}


async def test_docs_load_swagger_ui_from_this_server_not_a_cdn(serve_app):
    client = await serve_app(models=["tests.fakes:echo"])
    page = await client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert len(urls) == 4, urls  # the script, the stylesheet, the icon and the OpenAPI document
    assert "http" not in page.text.replace("http-equiv", "")  # no absolute URL anywhere
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        answer = await client.get(url)
        assert answer.status_code == 200 and len(answer.content) > 1000, url
    assert (await client.get("/docs/assets/secrets.txt")).status_code == 404


async def test_a_route_of_an_app_not_loaded_says_which_app_serves_it(serve_app):
    client = await serve_app(models=["tests.fakes:echo"])
    embeddings = await client.post("/v1/embeddings", json={"input": ["hello"]})
    assert embeddings.status_code == 404
    error = embeddings.json()["error"]  # OpenAI's shape under /v1
    assert error["message"] == (
        "POST /v1/embeddings is served by --app embeddings, which this server was not started with (it serves: models)"
    )
    assert error["type"] == "invalid_request_error" and error["code"] == "not_found"
    infill = await client.post("/infill", json={"text": "a [MASK] day"})
    assert infill.status_code == 404 and "--app infill" in infill.json()["error"]["message"]
    unknown = await client.get("/nothing/here")
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "Not Found"
    missing_model = await client.post("/models/nope/predict", json={"inputs": [1]})
    assert missing_model.status_code == 404 and "no model named 'nope'" in missing_model.json()["error"]["message"]


def test_the_route_table_is_the_routes_the_apps_build():
    services = build_services(Settings.from_options(apps=["all"], models=["tests.fakes:echo"]))
    built = {service.name: {route.path for route in service.router.routes} for service in services}
    assert {name: set(paths) for name, paths in APP_ROUTES.items()} == {k: v for k, v in built.items() if k != "models"}
    assert set(MODEL_ROUTES) == built["models"]
    assert who_serves("/v1/chat/completions") == "--app generation"
    assert who_serves("/models/x/predict") == "--model module:attr"
    assert who_serves("/") is None and who_serves("/v1/embeddingsX") is None
    # the routes the server adds for the models of several apps: there with any of them, absent without
    for apps in (["generation"], ["embeddings"]):
        paths = set(create_app(Settings.from_options(apps=apps)).openapi()["paths"])
        assert set(SHARED_ROUTES) <= paths and all(apps[0] in SHARED_ROUTES[path] for path in SHARED_ROUTES)
    assert not set(SHARED_ROUTES) & set(create_app(Settings.from_options(models=["tests.fakes:echo"])).openapi()["paths"])
    assert who_serves("/tokenize") == "--app generation or --app embeddings"


def output_of(server: ServerProcess) -> str:
    terminate(server.process)
    output = server.process.stdout.read().decode(errors="replace")
    server.process.stdout.close()
    return output


@pytest.mark.parametrize("http_workers", ["1", "2"])
def test_the_server_says_where_it_listens_and_when_it_is_ready(http_workers):
    server = ServerProcess("--model", "tests.fakes:echo", "--http-workers", http_workers)
    output = output_of(server)
    lines = [line for line in output.splitlines() if line.startswith("batchserve: ")]
    ready = f"batchserve: ready on http://127.0.0.1:{server.port} (models)"
    assert lines.count(ready) == 1, output
    listening = [line for line in lines if line.startswith("batchserve: listening on ")]
    assert len(listening) <= 1 and lines.index(ready) == len(lines) - 1, output  # the ready line comes last
    for line in listening:
        assert line.startswith(f"batchserve: listening on http://127.0.0.1:{server.port}; loading models"), output
