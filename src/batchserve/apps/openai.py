"""Shapes shared by the OpenAI-compatible routes (``/v1/...``): usage, models, errors.

* :func:`usage` is OpenAI's ``usage`` object.
* :func:`served_model` resolves a request's ``model``: absent (or null) means the model the
  route serves; any other name than a served one is a 404 (:class:`ModelNotFoundError`).
* :func:`error_body` is OpenAI's error object, ``{"error": {"message", "type", "param",
  "code"}}``: ``type`` is ``invalid_request_error`` for a 4xx and ``server_error`` for a
  5xx (OpenAI's own values), ``code`` is batchserve's error kind (``invalid_request``,
  ``model_not_found``, ``context_length_exceeded``, ``overloaded``, ``deadline``...).  The
  server answers every ``/v1/*`` error in this shape (:mod:`batchserve.server.errors`), so
  the official client raises its typed errors: ``NotFoundError`` (404),
  ``UnprocessableEntityError`` (422), ``InternalServerError`` (5xx).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from batchserve.errors import ModelNotFoundError

#: paths answered in OpenAI's shapes, errors included
OPENAI_PREFIX = "/v1/"


def usage(prompt_tokens: int, completion_tokens: int | None = None) -> dict[str, int]:
    """OpenAI's ``usage`` object; embeddings have no completion tokens."""
    if completion_tokens is None:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def texts_of(value: Any, field: str) -> list[str]:
    """The texts of an OpenAI "a string or a list of strings" field, for a before-validator
    (so that a wrong type gets one clear message, not one per member of the union)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"{field} must be a string or a list of strings")
    return texts


def served_model(requested: str | None, served: str, route: str) -> str:
    """The model a request to ``route`` gets: ``served`` when it names none or names it."""
    if requested is None or requested == served:
        return served
    raise ModelNotFoundError(
        f"the model {requested!r} is not served at {route}; it serves {served!r} (GET /v1/models lists every model)"
    )


def is_openai_path(path: str) -> bool:
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
