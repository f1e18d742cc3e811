"""Which app serves which route, known without building any app.

So that a server can answer a request for a route of an app it was not started with by
naming the ``--app`` that serves it, rather than a bare 404.  A test holds this table to the
routes the apps really build.
"""

from __future__ import annotations

import re

#: each built-in app's routes (its ``--app`` name → paths; ``{name}`` is one path segment)
APP_ROUTES: dict[str, tuple[str, ...]] = {
    "embeddings": ("/v1/embeddings", "/cluster"),
    "generation": ("/v1/completions", "/v1/chat/completions", "/autocomplete", "/", "/editor/{name}"),
    "infill": ("/infill",),
}
#: routes the server adds for the models of any of these apps (the first named in a 404)
SHARED_ROUTES: dict[str, tuple[str, ...]] = {
    "/tokenize": ("generation", "embeddings"),
    "/detokenize": ("generation", "embeddings"),
}
#: the routes of users' own models (``--model``)
MODEL_ROUTES: tuple[str, ...] = ("/models/{name}/predict", "/models")


def who_serves(path: str) -> str | None:
    """``"--app NAME"`` (or ``"--model module:attr"``) for a path one of them serves; None otherwise.

    ``/`` is left out: a server without the generation app's editor has its own page there."""
    if path == "/":
        return None
    for app, routes in APP_ROUTES.items():
        if any(matches(route, path) for route in routes):
            return f"--app {app}"
    if path in SHARED_ROUTES:
        return " or ".join(f"--app {app}" for app in SHARED_ROUTES[path])
    if any(matches(route, path) for route in MODEL_ROUTES):
        return "--model module:attr"
    return None


def matches(route: str, path: str) -> bool:
    """Whether ``path`` is one of ``route``'s (its ``{name}`` parts: one path segment each)."""
    pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}]+\})", route))
    return re.fullmatch(pattern, path) is not None
