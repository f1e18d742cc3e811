"""A FastAPI route that takes a well-formed JSON request without FastAPI's per-request machinery.

For every request FastAPI parses the content type with :mod:`email.message`, decodes the body
with :mod:`json` and solves the endpoint's dependency graph (for the deadline header alone,
about a quarter of the server's CPU per request on ``/v1/embeddings`` with a zero-cost model:
benchmarks/overhead.py).  :class:`JSONBodyRoute` serves endpoints of one shape,

    async def endpoint(body: SomeModel, name: str, timeout: float = Depends(deadline)) -> Response

(one pydantic body model, ``str`` path parameters, dependencies that read one header each:
:func:`~batchserve.apps.base.deadline_dependency`), by decoding the body with orjson,
validating it with the model and reading the header itself.  A request it does not take as
is (another content type, a body that is not JSON or does not validate) goes to FastAPI's own
handler, so every error answer is FastAPI's; the route, its OpenAPI entry and the exception
handlers are FastAPI's too.  An endpoint of another shape is left to FastAPI entirely.

The endpoint must return a :class:`~starlette.responses.Response`; routes of this class must
be included without router-level dependencies (they would not run on the fast path).
HTTP plumbing: the apps' routes use it, so it imports nothing of the app (:mod:`batchserve.server.app`).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from typing import Any, Callable, Coroutine

import orjson
from fastapi import params
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class JSONBodyRoute(APIRoute):
    """``call_json(raw, path_params, header)``: the endpoint called without a request, for
    callers in this process (a batch job): its Response, or None for a request it does not take
    (not ``application/json``, or a body that does not validate: the caller then sends it
    through the app); the endpoint's exceptions are raised."""

    call_json: Callable[[bytes, Mapping[str, str], Callable[[str], str | None]], Coroutine[Any, Any, Response | None]] | None = None

    def get_route_handler(self) -> Handler:
        fallback = super().get_route_handler()
        plan = _plan(self.endpoint, set(self.param_convertors))
        if plan is None:
            return fallback
        endpoint = self.endpoint
        body_name, model, path_names, headers = plan

        async def call(raw: bytes, path: Mapping[str, str], header: Callable[[str], str | None]) -> Response | None:
            """The endpoint's answer to a JSON body ``raw``, or None for a request it does not take as is."""
            content_type = header("content-type")
            if content_type is None or content_type.partition(";")[0].strip().lower() != "application/json":
                return None
            try:
                body = model.model_validate(orjson.loads(raw))
            except (orjson.JSONDecodeError, ValidationError):
                return None
            arguments = {body_name: body}
            for name in path_names:
                arguments[name] = path[name]
            for name, (name_of_header, parse) in headers.items():
                arguments[name] = parse(header(name_of_header))
            response = await endpoint(**arguments)
            if not isinstance(response, Response):
                raise TypeError(f"{endpoint.__qualname__} must return a Response on a JSONBodyRoute")
            return response

        async def handle(request: Request) -> Response:
            try:
                raw = await request.body()  # kept on the request: the fallback reads it again
            except HTTPException:  # 413 from the body limit
                raise
            except Exception:
                return await fallback(request)
            response = await call(raw, request.path_params, request.headers.get)
            return response if response is not None else await fallback(request)

        self.call_json = call
        return handle


def _plan(endpoint: Callable, path_params: set[str]):
    """(body parameter, its model, path parameters, {parameter: (header, parse)}) for an
    endpoint of the shape this route serves, else None."""
    if not inspect.iscoroutinefunction(endpoint):
        return None
    try:
        hints = typing.get_type_hints(endpoint)
    except Exception:
        return None
    body: tuple[str, type[BaseModel]] | None = None
    path_names: list[str] = []
    headers: dict[str, tuple[str, Callable[[str | None], Any]]] = {}
    for name, parameter in inspect.signature(endpoint).parameters.items():
        annotation = hints.get(name)
        if isinstance(parameter.default, params.Depends):
            from_header = getattr(parameter.default.dependency, "from_header", None)
            if from_header is None:
                return None
            headers[name] = from_header
        elif name in path_params and annotation is str and parameter.default is inspect.Parameter.empty:
            path_names.append(name)
        elif (
            inspect.isclass(annotation) and issubclass(annotation, BaseModel)
            and parameter.default is inspect.Parameter.empty and body is None
        ):
            body = (name, annotation)
        else:
            return None
    if body is None or set(path_names) != path_params:
        return None
    return body[0], body[1], path_names, headers
