"""Every error becomes a JSON body with its status.

422 validation, 413 body too large, 404 unknown route or model, 503 overload/not ready
(with ``Retry-After``), 504 deadline, 500 model error (the message, never a traceback).
A route of a built-in app this server was not started with is a 404 that names the
``--app`` serving it.

``/v1/*`` routes answer in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}`` (:func:`batchserve.server.openai_errors.error_body`: ``type`` is OpenAI's
``invalid_request_error`` / ``server_error``, ``code`` batchserve's kind), so OpenAI's clients
raise their typed errors; every other route answers ``{"error": {"message", "type"}}`` with
``type`` batchserve's kind.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from batchserve.apps.routes import who_serves
from batchserve.errors import BatchserveError, ClientDisconnectedError, NotReadyError, OverloadedError
from batchserve.server.json_response import FastJSONResponse
from batchserve.server.openai_errors import ErrorBody, error_body, is_openai_path

log = logging.getLogger("batchserve.server")

HTTP_KINDS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}

#: the errors every service route may answer, as the OpenAPI spec documents them
ERROR_RESPONSES = {
    413: {"model": ErrorBody, "description": "the request body is larger than --max-body-bytes"},
    422: {"model": ErrorBody, "description": "invalid request: the message names the field and the limit"},
    503: {"model": ErrorBody, "description": "overloaded or not ready: retry after Retry-After seconds"},
    504: {"model": ErrorBody, "description": "the request's deadline passed before its answer was ready"},
}


def error_content(path: str, status: int, kind: str, message: str, param: str | None = None, **extra) -> dict:
    """The error body for ``path``: OpenAI's shape under ``/v1/``, batchserve's elsewhere."""
    if is_openai_path(path):
        return error_body(status, kind, message, param, **extra)
    return {"error": {"message": message, "type": kind, **extra}}


def error_response(
    request: Request, status: int, kind: str, message: str, headers: dict | None = None, param: str | None = None, **extra
) -> FastJSONResponse:
    body = error_content(request.url.path, status, kind, message, param, **extra)
    return FastJSONResponse(body, status_code=status, headers=headers)


def count_error(request: Request, kind: str) -> None:
    counter = getattr(request.app.state, "errors_total", None)
    if counter is not None:
        counter.labels(kind=kind).inc()


async def on_batchserve_error(request: Request, error: BatchserveError) -> FastJSONResponse:
    count_error(request, error.kind)
    if isinstance(error, ClientDisconnectedError):
        log.info("client went away on %s: %s", request.url.path, error.message)
    headers = None
    if isinstance(error, (OverloadedError, NotReadyError)):
        headers = {"Retry-After": str(math.ceil(error.retry_after))}
    if error.status_code >= 500 and error.kind == "model":
        log.warning("model error on %s: %s", request.url.path, error.message)
    return error_response(request, error.status_code, error.kind, error.message, headers, param=error.param)


#: pydantic error types whose name is a more precise ``code`` than ``invalid_request``
NAMED_PROBLEMS = {"unsupported_parameter", "unsupported_value"}


async def on_validation_error(request: Request, error: RequestValidationError) -> FastJSONResponse:
    count_error(request, "invalid_request")
    errors = error.errors()
    problems = [_describe(problem) for problem in errors]
    if errors and errors[0].get("type") == "json_invalid":
        problems[0] = _json_problem(errors[0], error.body)
    elif errors and tuple(errors[0].get("loc", ())) == ("body",) and not is_json_type(request.headers.get("content-type")):
        problems[0] = _content_type_problem(request.headers.get("content-type"))
    message = "; ".join(problems[:5]) or "invalid request"
    first = errors[0] if errors else {}
    kind = first.get("type") if first.get("type") in NAMED_PROBLEMS else "invalid_request"
    return error_response(request, 422, kind, message, param=_param(first), details=problems)


async def on_http_error(request: Request, error: HTTPException) -> FastJSONResponse:
    status, message = error.status_code, str(error.detail)
    if status == 400:  # FastAPI's "There was an error parsing the body": a bad body is a 422 like any other
        status, message = 422, f"the request body could not be parsed: {message}"
    kind = HTTP_KINDS.get(status, "invalid_request" if status == 422 else "http_error")
    if status == 404 and message == "Not Found":  # no route matched: maybe one of an app not loaded
        message = not_loaded_message(request) or message
    if status >= 400:
        count_error(request, kind)
    return error_response(request, status, kind, message, getattr(error, "headers", None))


def not_loaded_message(request: Request) -> str | None:
    """For a path no route matched: the ``--app`` (or ``--model``) that serves it, if any."""
    serving = who_serves(request.url.path)
    if serving is None:
        return None
    services = getattr(request.app.state, "services", None) or []
    loaded = ", ".join(service.name for service in services) or "nothing"
    return (
        f"{request.method} {request.url.path} is served by {serving}, which this server was not "
        f"started with (it serves: {loaded})"
    )


async def on_unexpected_error(request: Request, error: Exception) -> FastJSONResponse:
    count_error(request, "internal")
    log.exception("unexpected error on %s", request.url.path)
    return error_response(request, 500, "internal", f"internal error: {type(error).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(BatchserveError, on_batchserve_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)


def is_json_type(content_type: str | None) -> bool:
    """Whether a Content-Type is JSON (``application/json``, ``application/*+json``): the only
    bodies FastAPI parses as JSON (since 0.165 not even a body without the header, so that a
    browser's form or ``text/plain`` post cannot reach a route: cross-site requests)."""
    if not content_type:
        return False
    kind = content_type.partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _content_type_problem(content_type: str | None) -> str:
    """The body was not read as JSON: say which header would have made it so."""
    sent = f"Content-Type: {content_type[:60]}" if content_type else "no Content-Type header"
    return f"the body must be JSON sent with the header Content-Type: application/json (this request had {sent})"


def _json_problem(problem: dict, document) -> str:
    """An unparsable JSON body, said where: ``Expecting value at line 2, column 8 (char 22)``
    (FastAPI's own message is the bare offset: ``22: JSON decode error``)."""
    reason = (problem.get("ctx") or {}).get("error") or "invalid JSON"
    position = next((part for part in problem.get("loc", ())[1:] if isinstance(part, int)), None)
    if position is None:
        return f"the body is not valid JSON: {reason}"
    if isinstance(document, (bytes, bytearray)):
        document = document.decode("utf-8", "replace")
    if isinstance(document, str):
        line = document.count("\n", 0, position) + 1
        column = position - document.rfind("\n", 0, position)
        return f"the body is not valid JSON: {reason} at line {line}, column {column} (char {position})"
    return f"the body is not valid JSON: {reason} at char {position}"


def _describe(problem: dict) -> str:
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
    message = "unknown field" if problem.get("type") == "extra_forbidden" else problem.get("msg", "invalid")
    return f"{where}: {message}" if where else message


def _param(problem: dict) -> str | None:
    """OpenAI's ``param``: the body field at fault (``messages.0.role``), or the header's name."""
    location = list(problem.get("loc", ()))
    if not location:
        return None
    if location[0] in ("header", "query", "path"):
        return str(location[1]) if len(location) > 1 else None
    fields = [part for part in location if part != "body"]
    if not fields or isinstance(fields[0], int):  # the body as a whole (not JSON, say)
        return None
    return ".".join(str(part) for part in fields)
