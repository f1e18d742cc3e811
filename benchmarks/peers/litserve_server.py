"""Lightning AI LitServe with its own batching: ``max_batch_size=64``, ``batch_timeout=0.01``.

One request carries one text (``{"input": [text]}``), answered in the same OpenAI shape.
LitServe answers ``GET /health`` with 200 once its worker has loaded the model.
"""

from __future__ import annotations

import litserve as ls
from common import MODEL_NAME, load_encoder, port_argument, texts_of

BATCH_SIZE = 64
BATCH_TIMEOUT = 0.01


class EmbeddingAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.encoder = load_encoder()

    def decode_request(self, request: dict) -> str:
        return texts_of(request)[0]

    def predict(self, texts: list[str]) -> list:
        return list(self.encoder.encode(texts, convert_to_numpy=True))  # as users write it: sentence-transformers batches by 32

    def encode_response(self, vector) -> dict:
        return {
            "object": "list",
            "data": [{"object": "embedding", "embedding": vector.tolist(), "index": 0}],
            "model": MODEL_NAME,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }


if __name__ == "__main__":
    api = EmbeddingAPI(max_batch_size=BATCH_SIZE, batch_timeout=BATCH_TIMEOUT, api_path="/v1/embeddings")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=port_argument(), log_level="warning", generate_client_file=False)
