"""ShannonAI service-streamer: ``ThreadedStreamer(predict, batch_size=64, max_latency=0.1)``
behind a FastAPI endpoint.

The endpoint is a plain ``def``, so FastAPI runs it in its thread pool, where
``streamer.predict`` blocks until the request's batch is done; the pool is widened to
512 threads so that 64 and more requests can wait on one batch at the same time.
"""

from __future__ import annotations

import contextlib

import anyio.to_thread
import uvicorn
from common import load_encoder, openai_answer, port_argument, texts_of
from fastapi import Body, FastAPI, Response
from service_streamer import ThreadedStreamer

BATCH_SIZE = 64
MAX_LATENCY = 0.1
THREADS = 512


def build_app() -> FastAPI:
    encoder = load_encoder()

    def predict(batch: list[str]) -> list:
        return list(encoder.encode(batch, convert_to_numpy=True))  # as users write it: sentence-transformers batches by 32

    streamer = ThreadedStreamer(predict, batch_size=BATCH_SIZE, max_latency=MAX_LATENCY)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/embeddings")
    def embeddings(body: dict = Body(...)) -> Response:
        return Response(openai_answer(streamer.predict(texts_of(body))), media_type="application/json")

    @app.get("/readyz")
    def ready() -> dict:
        return {"ready": True}

    return app


if __name__ == "__main__":
    uvicorn.run(build_app(), host="127.0.0.1", port=port_argument(), log_level="warning", access_log=False)
