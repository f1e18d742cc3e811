"""The ONNX Runtime encoder: a sentence-transformers model exported once, run by onnxruntime.

The model's transformer is exported once from its weights into the cache directory
(:func:`batchserve.cache.default_cache_dir`, ``onnx/``), with the legacy TorchScript exporter
(eager attention, dynamic batch and sequence axes), then fused by onnxruntime's BERT
optimizer.  Pooling and normalization run in numpy, as the model's own sentence-transformers
modules say (``modules.json`` and the pooling config).

``quantize="int8"`` quantizes the fused graph's MatMul weights (dynamic, per-channel,
signed 8-bit), cached beside the fp32 file, and guards it with a quality gate at load: the
cosine between int8 and fp32 embeddings of the calibration texts shipped in the package
(``batchserve/data/calibration.txt``) must average at least ``min_mean_cosine`` with none below
``min_cosine``; else :meth:`OnnxEncoder.load` raises :class:`QualityGateError` naming the figures.

Cache entries are directories named by a key over the model file (path, size, mtime), the
exporter's versions (torch, transformers, onnxruntime, :data:`EXPORT_FORMAT`) and the
precision.  Each is written by :func:`batchserve.cache.write_entry` (a temporary sibling,
renamed when complete); its ``manifest.json`` repeats the key's facts and the graph file's
size, and an entry whose manifest is missing, differs, or whose graph file has another size
is exported again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from batchserve.cache import default_cache_dir, write_entry
from batchserve.runtimes.base import EncoderRuntime

log = logging.getLogger("batchserve.runtimes")

#: bump when the exported files change shape or meaning: older cache entries are then ignored
EXPORT_FORMAT = 1
GRAPH = "model.onnx"
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "int8")
MIN_MEAN_COSINE = 0.99
MIN_COSINE = 0.98
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class QualityGateError(RuntimeError):
    """The quantized model's embeddings are too far from the fp32 model's."""


def calibration_texts() -> list[str]:
    """The texts the int8 quality gate measures on (one per line, shipped in the package)."""
    text = resources.files("batchserve").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


# --------------------------------------------------------------------------- the model's modules


def sentence_modules(path: str | Path) -> dict[str, Any]:
    """Pooling mode, normalization and max length, read from the model's sentence-transformers files."""
    root = Path(path)
    modules = json.loads((root / "modules.json").read_text())
    kinds = {entry["type"].rpartition(".")[2]: entry for entry in modules}
    if "Pooling" not in kinds:
        raise ValueError(f"{root}: modules.json has no Pooling module; the ONNX runtime needs one")
    unknown = set(kinds) - {"Transformer", "Pooling", "Normalize"}
    if unknown:
        raise ValueError(f"{root}: modules {sorted(unknown)} are not supported by the ONNX runtime; use --runtime torch")
    pooling = json.loads((root / kinds["Pooling"]["path"] / "config.json").read_text())
    known = ("cls_token", "mean_tokens", "max_tokens")
    modes = [name for name in known if pooling.get(f"pooling_mode_{name}")]
    others = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k[13:] not in known]
    if len(modes) != 1 or others:
        raise ValueError(f"{root}: pooling {pooling} is not supported by the ONNX runtime (one of cls, mean, max)")
    config = root / "sentence_bert_config.json"
    max_length = json.loads(config.read_text()).get("max_seq_length") if config.is_file() else None
    if not max_length:
        max_length = json.loads((root / "config.json").read_text()).get("max_position_embeddings", 512)
    return {"pooling": modes[0], "normalize": "Normalize" in kinds, "max_length": int(max_length)}


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Token states ``[rows, tokens, dim]`` → one vector per row, as sentence-transformers pools."""
    if mode == "cls_token":
        return hidden[:, 0]
    weights = mask[:, :, None].astype(hidden.dtype)
    if mode == "max_tokens":
        return np.where(weights > 0, hidden, np.finfo(hidden.dtype).min).max(axis=1)
    summed = (hidden * weights).sum(axis=1)
    return summed / np.clip(weights.sum(axis=1), 1e-9, None)


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.clip(norms, 1e-12, None)


# --------------------------------------------------------------------------- the export cache


def export_key(model_path: str | Path, precision: str) -> dict[str, Any]:
    """What a cache entry depends on: the model file, the exporter's versions, the precision."""
    from importlib.metadata import version

    weights = _weights_file(Path(model_path))
    stat = weights.stat()
    return {
        "model": str(weights.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "torch": version("torch"),  # read without importing torch: a cached start never imports it
        "transformers": version("transformers"),
        "onnxruntime": version("onnxruntime"),
        "format": EXPORT_FORMAT,
        "precision": precision,
    }


def entry_dir(key: dict[str, Any], cache_dir: Path) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "onnx" / f"{Path(key['model']).parent.name}-{key['precision']}-{digest}"


def cached_graph(key: dict[str, Any], cache_dir: Path) -> Path | None:
    """The graph file of a complete entry written for exactly ``key``, else None."""
    entry = entry_dir(key, cache_dir)
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        graph = entry / GRAPH
        if manifest.get("key") != key or graph.stat().st_size != manifest.get("bytes"):
            return None
    except (OSError, ValueError):
        return None
    return graph


def _weights_file(root: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root} has no model.safetensors or pytorch_model.bin")


def _write_entry(key: dict[str, Any], cache_dir: Path, build) -> Path:
    """Run ``build(graph_path)`` into a new cache entry (:func:`~batchserve.cache.write_entry`)
    with its manifest; an entry another process completed meanwhile is used as it is."""
    entry = entry_dir(key, cache_dir)

    def write(scratch: Path) -> None:
        graph = scratch / GRAPH
        build(graph)
        manifest = {"key": key, "bytes": graph.stat().st_size}
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1))

    write_entry(entry, write, lambda _: cached_graph(key, cache_dir) is not None)
    return entry / GRAPH


def ensure_graph(model_path: str | Path, precision: str = "fp32", cache_dir: str | Path | None = None) -> Path:
    """The cached ONNX graph of the model at ``precision``, exporting (and quantizing) first if needed."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = export_key(model_path, precision)
    graph = cached_graph(key, cache)
    if graph is not None:
        return graph
    started = time.perf_counter()
    if precision == "fp32":
        log.warning("exporting %s to ONNX into %s (once)", model_path, entry_dir(key, cache))
        graph = _write_entry(key, cache, lambda target: export_fused(model_path, target))
    else:
        source = ensure_graph(model_path, "fp32", cache)
        log.warning("quantizing %s to int8 into %s (once)", source, entry_dir(key, cache))
        graph = _write_entry(key, cache, lambda target: quantize_int8(source, target))
    log.warning("ONNX %s graph ready in %.1f s", precision, time.perf_counter() - started)
    return graph


def export_fused(model_path: str | Path, target: Path) -> None:
    """Export the transformer (legacy exporter, eager attention) and fuse it with ORT's BERT optimizer."""
    import warnings

    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    root = Path(model_path)
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    model = AutoModel.from_pretrained(root, local_files_only=True, attn_implementation="eager").eval()

    class Transformer(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    example = tokenizer(["a short one", "a somewhat longer example sentence to trace with padding"], padding=True, return_tensors="pt")
    if "token_type_ids" not in example:
        raise ValueError(f"{root}: the ONNX runtime supports BERT-like models (with token_type_ids); use --runtime torch")
    raw = target.with_name("raw.onnx")
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, "last_hidden_state")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Transformer(model),
            tuple(example[name] for name in INPUTS),
            str(raw),
            input_names=list(INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    from onnxruntime.transformers.optimizer import optimize_model

    config = AutoConfig.from_pretrained(root, local_files_only=True)
    fused = optimize_model(
        str(raw), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size, opt_level=0
    )
    fused.save_model_to_file(str(target))
    raw.unlink()


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of the MatMul weights, per output channel (signed)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        # the fused ops (com.microsoft domain) have no shape inference: their outputs are float
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


# --------------------------------------------------------------------------- the runtime


class FastTokenizer:
    """The model's ``tokenizer.json`` run by the tokenizers library (no transformers, no torch
    imported): truncated at ``max_length``, padded to the longest text, numpy int64 out."""

    def __init__(self, path: Path, max_length: int):
        from tokenizers import Tokenizer

        config = path.parent / "tokenizer_config.json"
        pad = (json.loads(config.read_text()).get("pad_token") if config.is_file() else None) or "[PAD]"
        if isinstance(pad, dict):
            pad = pad.get("content", "[PAD]")
        self.tokenizer = Tokenizer.from_file(str(path))
        pad_id = self.tokenizer.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"{path}: no padding token {pad!r} in the vocabulary")
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad)  # to the longest in the batch

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encoded = self.tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
        }


def load_tokenizer(path: str | Path, max_length: int):
    """:class:`FastTokenizer` when the model has a ``tokenizer.json``, else transformers' own."""
    file = Path(path) / "tokenizer.json"
    if file.is_file():
        return FastTokenizer(file, max_length)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def session(graph: Path, threads: int):
    """An inference session with ``threads`` intra-op threads, sequential, no spinning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def default_threads() -> int:
    """The thread count this process was given (``OMP_NUM_THREADS``: the process backend's
    workers, gunicorn's HTTP workers), else every core (:func:`batchserve.devices.process_threads`)."""
    from batchserve.devices import process_threads

    return process_threads()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (normalize(a) * normalize(b)).sum(axis=1)


class OnnxEncoder(EncoderRuntime):
    """A sentence-transformers model run by ONNX Runtime on the CPU, fp32 or int8 (see the module doc)."""

    name = "onnx"

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        threads: int | None = None,
        quantize: str = "none",
        cache_dir: str | Path | None = None,
        min_mean_cosine: float = MIN_MEAN_COSINE,
        min_cosine: float = MIN_COSINE,
    ):
        if not str(device).startswith("cpu"):
            raise ValueError(f"the ONNX runtime runs on the CPU only, not {device}; use --runtime torch")
        if quantize not in ("none", "int8"):
            raise ValueError(f"unknown quantization {quantize!r}; choose none or int8")
        super().__init__(path, "cpu", threads)
        self.precision = "int8" if quantize == "int8" else "fp32"
        self.cache_dir = cache_dir
        self.min_mean_cosine = min_mean_cosine
        self.min_cosine = min_cosine
        self.requested_threads = threads
        self.gate: dict[str, Any] | None = None
        self.graph: Path | None = None
        self.session = None
        self._pid = 0
        self.tokenizer = None
        self.modules: dict[str, Any] = {}

    def load(self) -> None:
        self.modules = sentence_modules(self.path)
        self.tokenizer = load_tokenizer(self.path, self.max_length)
        threads = self.requested_threads or default_threads()
        self.threads = threads
        self.graph = ensure_graph(self.path, self.precision, self.cache_dir)
        self.session, self._pid = session(self.graph, threads), os.getpid()
        if self.precision == "int8":
            self.gate = self.check_quality(session(ensure_graph(self.path, "fp32", self.cache_dir), threads))

    def check_quality(self, reference) -> dict[str, Any]:
        """Cosine of this model's embeddings against ``reference``'s (fp32) on the calibration texts."""
        texts = calibration_texts()
        ours = np.concatenate([self.encode(texts[i : i + 16]) for i in range(0, len(texts), 16)])
        theirs = np.concatenate([self._run(reference, texts[i : i + 16])[0] for i in range(0, len(texts), 16)])
        values = cosines(ours, theirs)
        gate = {
            "texts": len(texts),
            "mean_cosine": round(float(values.mean()), 5),
            "min_cosine": round(float(values.min()), 5),
            "required": {"mean": self.min_mean_cosine, "min": self.min_cosine},
        }
        if gate["mean_cosine"] < self.min_mean_cosine or gate["min_cosine"] < self.min_cosine:
            raise QualityGateError(
                f"int8 quality gate failed for {self.path}: cosine against fp32 on {len(texts)} calibration texts "
                f"mean {values.mean():.4f} (needs >= {self.min_mean_cosine}), min {values.min():.4f} "
                f"(needs >= {self.min_cosine}); serve without --quantize int8"
            )
        log.info("int8 quality gate passed: %s", gate)
        return gate

    @property
    def max_length(self) -> int:
        return self.modules["max_length"]

    def _tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        if isinstance(self.tokenizer, FastTokenizer):
            return self.tokenizer(texts)
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return {name: encoded[name].astype(np.int64) for name in INPUTS if name in encoded}

    def _run(self, runner, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        feeds = self._tokenize(texts)
        feeds.setdefault("token_type_ids", np.zeros_like(feeds["input_ids"]))
        (hidden,) = runner.run(None, feeds)
        mask = feeds["attention_mask"]
        vectors = pool(hidden, mask, self.modules["pooling"])
        if self.modules["normalize"]:
            vectors = normalize(vectors)
        return vectors.astype(np.float32, copy=False), [int(n) for n in mask.sum(axis=1)]

    def token_counts(self, texts: list[str]) -> list[int]:
        if isinstance(self.tokenizer, FastTokenizer):
            return [int(n) for n in self.tokenizer(texts)["attention_mask"].sum(axis=1)]
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [len(ids) for ids in encoded]

    def _session(self):
        """This process's session.  A process forked from the one that loaded the model (the
        process backend's workers, gunicorn's HTTP workers) keeps the parent's single-threaded
        session when it was given one thread too (no thread pool to lose in the fork, and the
        weights stay shared copy-on-write); given more, it opens its own with that many."""
        if self._pid != os.getpid():
            threads = self.requested_threads or default_threads()
            if threads != self.threads or self.threads != 1:
                self.session, self.threads = session(self.graph, threads), threads
            self._pid = os.getpid()
        return self.session

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._run(self._session(), texts)[0]

    def encode_counted(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        return self._run(self._session(), texts)

    def describe(self) -> dict[str, Any]:
        threads = self.threads if self._pid == os.getpid() else (self.requested_threads or default_threads())
        info: dict[str, Any] = {"runtime": self.name, "device": self.device, "precision": self.precision, "threads": threads}
        if self.gate is not None:
            info["quality_gate"] = self.gate
        return info
