"""The naive baseline: FastAPI encoding each request on its own, one request at a time.

The endpoint calls ``encode`` right in an ``async def``, so requests run strictly one
after another and nothing is batched across requests.
"""

from __future__ import annotations

import uvicorn
from common import load_encoder, openai_answer, port_argument, texts_of
from fastapi import FastAPI, Request, Response


def build_app() -> FastAPI:
    encoder = load_encoder()
    app = FastAPI()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        texts = texts_of(await request.json())
        vectors = encoder.encode(texts, convert_to_numpy=True)
        return Response(openai_answer(vectors), media_type="application/json")

    @app.get("/readyz")
    async def ready() -> dict:
        return {"ready": True}

    return app


if __name__ == "__main__":
    uvicorn.run(build_app(), host="127.0.0.1", port=port_argument(), log_level="warning", access_log=False)
