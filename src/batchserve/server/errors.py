"""Every error becomes a JSON body ``{"error": {"message", "type"}}`` with its status.

422 validation, 413 body too large, 503 overload/not ready (with ``Retry-After``),
504 deadline, 500 model error (the message, never a traceback).
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from batchserve.errors import BatchserveError, ClientDisconnectedError, NotReadyError, OverloadedError
from batchserve.apps.responses import FastJSONResponse

log = logging.getLogger("batchserve.server")


def error_response(status: int, kind: str, message: str, headers: dict | None = None, **extra) -> FastJSONResponse:
    body = {"error": {"message": message, "type": kind, **extra}}
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
    return error_response(error.status_code, error.kind, error.message, headers)


async def on_validation_error(request: Request, error: RequestValidationError) -> FastJSONResponse:
    count_error(request, "invalid_request")
    problems = [_describe(problem) for problem in error.errors()]
    message = "; ".join(problems[:5]) or "invalid request"
    return error_response(422, "invalid_request", message, details=problems)


async def on_http_error(request: Request, error: HTTPException) -> FastJSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(error.status_code, "http_error")
    if error.status_code >= 400:
        count_error(request, kind)
    return error_response(error.status_code, kind, str(error.detail), getattr(error, "headers", None))


async def on_unexpected_error(request: Request, error: Exception) -> FastJSONResponse:
    count_error(request, "internal")
    log.exception("unexpected error on %s", request.url.path)
    return error_response(500, "internal", f"internal error: {type(error).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(BatchserveError, on_batchserve_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)


def _describe(problem: dict) -> str:
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
    message = problem.get("msg", "invalid")
    return f"{where}: {message}" if where else message
