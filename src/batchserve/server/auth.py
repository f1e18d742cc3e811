"""API keys: ``Authorization: Bearer KEY`` on every route but the public ones.

Keys come from ``--api-key`` (repeatable), ``BATCHSERVE_API_KEY`` (separated by spaces) and
``--api-key-file`` (one a line, ``#`` comment lines); with none the server is open, as before.
:class:`ApiKeyMiddleware` is a pure ASGI middleware (a few microseconds a request; Starlette's
``BaseHTTPMiddleware`` would cost far more) placed inside the CORS middleware, so that a
browser's preflight (``OPTIONS``, which never carries the key) is answered before it.

What needs no key (:data:`PUBLIC_PATHS`, :data:`PAGE_PATHS`):

* ``/healthz`` and ``/readyz``, for probes and load balancers (``/readyz`` shows no key);
* ``/metrics`` with ``--public-metrics``, for a Prometheus scraper;
* a batch's own requests, made in this process (the Batch API: the key was checked when the
  batch was created; the scope key :data:`~batchserve.batchjob.runner.INTERNAL_SCOPE`, which no
  client can set);
* the pages a browser opens (the editor at ``/``, ``/dashboard``) and their script and style
  files: static files holding no data, which the browser must load before the page can ask for
  the key.  Everything they fetch (``/autocomplete``, ``/dashboard/stats``) needs it.

A missing or wrong key gets 401 with ``WWW-Authenticate: Bearer``; under ``/v1`` the body is
OpenAI's error (``code: invalid_api_key``), so the official client raises its
``AuthenticationError``.  The check hashes the key sent and compares it with every key's hash
(:func:`hmac.compare_digest`, no early exit), so neither the time taken nor its length tells
which key, or how much of one, was close.  Keys never appear in a log line or an error body;
refused requests are counted in ``batchserve_auth_refused_total{reason="missing|invalid"}``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from importlib import resources
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from batchserve.batchjob.runner import INTERNAL_SCOPE
from batchserve.server.errors import error_content
from batchserve.server.json_response import dumps
from batchserve.settings import ServerSettings, key_problem

log = logging.getLogger("batchserve.server")

#: answered without a key: probes and load balancers
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
#: the script the pages share to ask for the key and send it (:func:`key_script`)
KEY_SCRIPT_PATH = "/web/apikey.js"
#: pages and their static files, public so that a browser can open them and then ask for the key
PAGE_PATHS = frozenset({"/", "/dashboard", "/editor/editor.js", "/editor/editor.css", KEY_SCRIPT_PATH})
#: the error kind (and OpenAI's ``code``) of a refused request
KIND = "invalid_api_key"
REASONS = ("missing", "invalid")
MESSAGES = {
    "missing": "this server needs an API key: send the header 'Authorization: Bearer KEY'",
    "invalid": "the API key sent is not one of this server's keys",
}


# --------------------------------------------------------------------------- keys


def read_key_file(path: str) -> list[str]:
    """The keys of ``path``: one a line; blank lines and lines starting with ``#`` are ignored
    (a ``#`` further on is part of the key).

    A missing, unreadable or keyless file is an error (the server refuses to start open when
    it was told to need a key); a bad key is named by its line, never shown.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise ValueError(f"--api-key-file {path}: cannot read it: {reason}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        problem = key_problem(key)
        if problem:
            raise ValueError(f"--api-key-file {path}, line {number}: {problem}")
        keys.append(key)
    if not keys:
        raise ValueError(f"--api-key-file {path} holds no key (one a line; blank lines and # comment lines are ignored)")
    return keys


def load_keys(server: ServerSettings) -> list[str]:
    """Every key the server accepts: ``api_keys`` (flags and ``BATCHSERVE_API_KEY``), then the file's."""
    keys = [key.get_secret_value() for key in server.api_keys]
    if server.api_key_file is not None:
        keys += read_key_file(server.api_key_file)
    return list(dict.fromkeys(keys))


class KeyChecker:
    """Whether a key is one of ``keys``, in a time that depends on neither which key nor its length.

    Only the keys' SHA-256 digests are kept; the key sent is hashed and compared with every one.
    """

    __slots__ = ("_digests",)

    def __init__(self, keys: list[str]):
        if not keys:
            raise ValueError("KeyChecker needs at least one key")
        self._digests = tuple(hashlib.sha256(key.encode("ascii")).digest() for key in keys)

    def __call__(self, presented: bytes) -> bool:
        digest = hashlib.sha256(presented).digest()
        found = False
        for known in self._digests:  # every key, always: no early exit
            found |= hmac.compare_digest(digest, known)
        return found

    def __repr__(self) -> str:
        return f"KeyChecker({len(self._digests)} keys)"


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's ``Authorization: Bearer TOKEN`` header, or None without one."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


def refused_counter(registry: CollectorRegistry) -> Counter:
    """``batchserve_auth_refused_total{reason}``, both reasons present from the start (at 0)."""
    counter = Counter(
        "batchserve_auth_refused", "Requests refused for a missing or invalid API key", ["reason"], registry=registry
    )
    for reason in REASONS:
        counter.labels(reason=reason)
    return counter


# --------------------------------------------------------------------------- middleware


class ApiKeyMiddleware:
    """Refuse a request without a valid key (401), unless its path is public."""

    def __init__(self, app: ASGIApp, keys: list[str], public: frozenset[str], refused: Counter | None = None):
        self.app = app
        self.check = KeyChecker(keys)
        self.public = public
        self.refused = {reason: refused.labels(reason=reason) for reason in REASONS} if refused is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan" or scope["path"] in self.public or scope.get(INTERNAL_SCOPE):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and self.check(token):
            await self.app(scope, receive, send)
            return
        reason = "missing" if token is None else "invalid"
        if self.refused is not None:
            self.refused[reason].inc()
        log.debug("refused %s: %s API key", scope["path"], reason)
        if kind == "websocket":
            await receive()  # websocket.connect; closing before accepting answers 403
            await send({"type": "websocket.close", "code": 1008})
            return
        await self._refuse(scope, send, reason)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, reason: str) -> None:
        body = dumps(error_content(scope["path"], 401, KIND, MESSAGES[reason]))
        challenge = b'Bearer realm="batchserve"' + (b', error="invalid_token"' if reason == "invalid" else b"")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", challenge),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def public_paths(server: ServerSettings) -> frozenset[str]:
    """The paths answered without a key under these settings."""
    public = PUBLIC_PATHS | PAGE_PATHS
    return public | {"/metrics"} if server.public_metrics else public


# --------------------------------------------------------------------------- the pages' script


def key_script() -> Response:
    """``web/apikey.js``: how the pages ask for the key once and send it on their requests."""
    script = (resources.files("batchserve") / "web" / "apikey.js").read_text(encoding="utf-8")
    return Response(script, media_type="text/javascript", headers={"Cache-Control": "no-cache"})
