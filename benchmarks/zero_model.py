"""Zero-cost models for measuring the server's own cost per request (benchmarks only, not a model).

* :class:`ZeroEncoder` is an encoder runtime that returns a fixed 384-float vector per text;
  ``python benchmarks/zero_model.py serve ...`` runs ``batchserve`` with it registered under
  every name of :data:`batchserve.runtimes.ENCODERS`, so ``/v1/embeddings`` does everything
  it does for the real model (token counts from the bundled tokenizer, batching, the
  backend's hop, the JSON answer) except the forward pass.  Process-backend workers fork from
  this process and inherit the registration.
* :func:`predict` is a ``--model`` for ``/models/NAME/predict``: the same vector per input.
* :func:`floor_app` is a bare ASGI app (``uvicorn --app-dir benchmarks zero_model:floor_app``):
  it reads the body and answers a constant embeddings answer of the same size, the floor of
  what HTTP on uvicorn costs per request.
"""

from __future__ import annotations

import sys

import numpy as np
import orjson

from batchserve.runtimes.base import EncoderRuntime

DIMENSIONS = 384
_VECTOR = (np.arange(DIMENSIONS, dtype=np.float32) - 191.5) / 2000.0  # fixed, non-trivial float digits


class ZeroEncoder(EncoderRuntime):
    name = "zero"

    def __init__(self, path: str, device: str = "cpu", threads: int | None = None, quantize: str = "none"):
        super().__init__(path, device, threads)

    def load(self) -> None:
        pass

    @property
    def max_length(self) -> int:
        return 256

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(text) // 4 + 2 for text in texts]

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.broadcast_to(_VECTOR, (len(texts), DIMENSIONS)).copy()


def predict(batch: list) -> list:
    """``--model zero=zero_model:predict``: one fixed 384-float vector per input."""
    return [_VECTOR] * len(batch)


def _floor_answer() -> bytes:
    answer = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": _VECTOR, "index": 0}],
        "model": "all-MiniLM-L6-v2",
        "usage": {"prompt_tokens": 9, "total_tokens": 9},
    }
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


_FLOOR = _floor_answer()


async def floor_app(scope, receive, send) -> None:
    """What uvicorn alone costs per request: read the body, send a constant answer."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = b'{"ready":true}' if scope["path"] == "/readyz" else _FLOOR
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import batchserve.runtimes as runtimes

    for name in list(runtimes.ENCODERS):
        runtimes.ENCODERS[name] = "zero_model:ZeroEncoder"  # importable: this directory is sys.path[0]
    from batchserve.cli import app

    sys.argv = ["batchserve", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
