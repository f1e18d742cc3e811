"""service-streamer's "BERT service in 5 minutes", redone with batchserve's compat module.

The model is the bundled all-MiniLM-L6-v2 sentence encoder.  Run it with::

    .venv/bin/uvicorn --factory examples.embedding_service:create_app --port 8001
    curl -s localhost:8001/embed -H 'content-type: application/json' -d '["hello world", "good night"]'

Every concurrent caller of ``/embed`` shares the workers' mini-batches.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI

from batchserve.apps.embeddings import EmbeddingModel
from batchserve.compat import ManagedModel, Streamer


class ManagedEmbedder(ManagedModel):
    """Loads once in each worker process; ``gpu_id`` is that worker's GPU (None on CPU)."""

    def init_model(self) -> None:
        self.model = EmbeddingModel(device="cpu" if self.gpu_id is None else "cuda")
        self.model.load()

    def predict(self, batch: list[str]) -> list[list[float]]:
        return [vector.tolist() for vector, _tokens in self.model.predict(batch)]


def build_app(streamer: Streamer, lifespan=None) -> FastAPI:
    app = FastAPI(title="embedding service", lifespan=lifespan)

    @app.post("/embed")
    def embed(sentences: list[str]) -> list[list[float]]:
        # a plain (threaded) endpoint, as in a Flask app: predict() blocks this thread only
        return streamer.predict(sentences)

    return app


def create_app() -> FastAPI:
    # wait for the workers to load here, before uvicorn takes requests (otherwise the first
    # calls wait for them, and fail if that takes longer than worker_timeout=20 s)
    streamer = Streamer(ManagedEmbedder, batch_size=64, max_latency=0.1, worker_num=2, wait_for_worker_ready=True)
    # on a GPU machine: Streamer(ManagedEmbedder, 64, 0.1, worker_num=4, cuda_devices=(0, 1), ...)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        streamer.destroy_workers()  # stop the worker processes with the server

    return build_app(streamer, lifespan)
