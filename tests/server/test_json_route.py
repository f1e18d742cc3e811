"""JSONBodyRoute answers exactly as FastAPI's own route does, and skips FastAPI's dependency
solving for a well-formed request (the point of it: benchmarks/overhead.py)."""

from __future__ import annotations

import fastapi.routing
import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from pydantic import BaseModel, Field

from batchserve.apps.base import deadline_dependency
from batchserve.server.errors import install_error_handlers
from batchserve.server.json_response import FastJSONResponse
from batchserve.server.json_route import JSONBodyRoute, _plan
from batchserve.settings import Settings


class Body(BaseModel):
    texts: list[str] = Field(min_length=1)
    scale: float = 1.0


def build(route_class) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    router = APIRouter(route_class=route_class)
    timeout = deadline_dependency(Settings())

    @router.post("/items/{name}")
    async def items(name: str, body: Body, seconds: float = Depends(timeout)):
        return FastJSONResponse({"name": name, "texts": body.texts, "scale": body.scale, "seconds": seconds})

    @router.get("/plain")
    async def plain():
        return {"ok": True}

    app.include_router(router)
    return app


REQUESTS = [  # (method, path, body bytes, headers)
    ("POST", "/items/a", b'{"texts": ["x", "y"], "scale": 2}', {"content-type": "application/json"}),
    ("POST", "/items/b", b'{"texts": ["x"]}', {"content-type": "application/json; charset=utf-8"}),
    ("POST", "/items/c", b'{"texts": ["x"]}', {"content-type": "Application/JSON", "x-request-timeout": "2.5"}),
    ("POST", "/items/d", b'{"texts": ["x"]}', {"content-type": "application/json", "x-request-timeout": "soon"}),
    ("POST", "/items/e", b'{"texts": ["x"]}', {"content-type": "application/json", "x-request-timeout": "1e9"}),
    ("POST", "/items/f", b'{"texts": []}', {"content-type": "application/json"}),
    ("POST", "/items/g", b'{"texts": "x", "scale": "big"}', {"content-type": "application/json"}),
    ("POST", "/items/h", b"{not json", {"content-type": "application/json"}),
    ("POST", "/items/i", b"", {"content-type": "application/json"}),
    ("POST", "/items/j", b'{"texts": ["x"], "scale": NaN}', {"content-type": "application/json"}),
    ("POST", "/items/k", b'{"texts": ["x"]}', {"content-type": "text/plain"}),
    ("POST", "/items/l", b'{"texts": ["x"]}', {}),
    ("POST", "/items/m", b'{"texts": ["x"]}', {"content-type": "application/vnd.api+json"}),
    ("POST", "/items/n", b"[1, 2]", {"content-type": "application/json"}),
    ("POST", "/items/o", '{"texts": ["\u00e9t\u00e9"]}'.encode(), {"content-type": "application/json"}),
    ("GET", "/plain", b"", {}),
]


@pytest.mark.parametrize("method, path, content, headers", REQUESTS, ids=[r[1] for r in REQUESTS])
async def test_answers_as_fastapi_does(method, path, content, headers):
    answers = []
    for route_class in (fastapi.routing.APIRoute, JSONBodyRoute):
        transport = httpx.ASGITransport(app=build(route_class))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            reply = await client.request(method, path, content=content, headers=headers)
        answers.append((reply.status_code, reply.headers.get("content-type"), reply.content))
    assert answers[0] == answers[1]


async def test_a_well_formed_request_skips_dependency_solving(monkeypatch):
    solved = []
    original = fastapi.routing.solve_dependencies

    async def counting(*args, **kwargs):
        solved.append(kwargs.get("request").url.path)
        return await original(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    transport = httpx.ASGITransport(app=build(JSONBodyRoute))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        fast = await client.post("/items/a", json={"texts": ["x"]}, headers={"x-request-timeout": "3"})
        slow = await client.post("/items/b", json={"texts": []})
    assert fast.json() == {"name": "a", "texts": ["x"], "scale": 1.0, "seconds": 3.0}
    assert slow.status_code == 422
    assert solved == ["/items/b"]  # only the invalid one went through FastAPI's handler


def test_other_shapes_are_left_to_fastapi():
    async def no_body(name: str):
        pass

    async def query_parameter(body: Body, limit: int = 3):
        pass

    def sync_endpoint(body: Body):
        pass

    async def plain_dependency(body: Body, value: int = Depends(lambda: 1)):
        pass

    for endpoint in (no_body, query_parameter, sync_endpoint, plain_dependency):
        assert _plan(endpoint, set()) is None, endpoint.__name__
    assert _plan(no_body, {"name"}) is None
