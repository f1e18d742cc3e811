"""OpenAI's error shapes, for the server's error answers on ``/v1/*`` and the routes' OpenAPI entries.

:func:`error_body` is OpenAI's error object, ``{"error": {"message", "type", "param",
"code"}}``: ``type`` is ``invalid_request_error`` for a 4xx and ``server_error`` for a 5xx
(OpenAI's own values), ``code`` is batchserve's error kind (``invalid_request``,
``model_not_found``, ``context_length_exceeded``, ``overloaded``, ``deadline``...).  The
server answers every ``/v1/*`` error in this shape (:mod:`batchserve.server.errors`), so the
official client raises its typed errors: ``NotFoundError`` (404),
``UnprocessableEntityError`` (422), ``InternalServerError`` (5xx).

HTTP plumbing: the apps use it too, so it imports nothing of the app (:mod:`batchserve.server.app`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

#: paths answered in OpenAI's shapes, errors included
OPENAI_PREFIX = "/v1/"


def is_openai_path(path: str) -> bool:
    """Whether ``path`` answers in OpenAI's shapes (errors included)."""
    return path.startswith(OPENAI_PREFIX)


def error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status."""
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, kind: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    """OpenAI's error object; batchserve's kind is its ``code``."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": kind, **extra}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """An error answer, as documented in the OpenAPI spec (``param`` and ``code`` on ``/v1/*``)."""

    error: ErrorDetail


#: the OpenAPI ``responses`` entry of a route that answers 404 for a model it does not serve
MODEL_NOT_FOUND = {404: {"model": ErrorBody, "description": "the request names a model not served here"}}
