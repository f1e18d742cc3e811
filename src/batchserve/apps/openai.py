"""Request and response shapes shared by the OpenAI-compatible apps (``/v1/...``).

* :func:`usage` is OpenAI's ``usage`` object.
* :func:`texts_of` reads OpenAI's "a string or a list of strings" fields.
* :func:`served_model` resolves a request's ``model``: absent (or null) means the model the
  route serves; any other name than a served one is a 404 (:class:`ModelNotFoundError`).

OpenAI's error shapes live with the server, which answers every error
(:mod:`batchserve.server.openai_errors`).
"""

from __future__ import annotations

from typing import Any

from batchserve.errors import ModelNotFoundError


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
