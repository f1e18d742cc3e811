"""The ONNX Runtime encoder on the bundled all-MiniLM-L6-v2: exact against sentence-transformers,
int8 behind its quality gate, and an export cache that is never used half-written or stale.

The model is exported (and quantized) once per test session into a temporary cache directory."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from batchserve.apps.embeddings import EmbeddingModel, bundled_model_path
from batchserve.runtimes import encoder_class
from batchserve.runtimes.onnx.encoder import (
    GRAPH,
    MANIFEST,
    OnnxEncoder,
    QualityGateError,
    cached_graph,
    calibration_texts,
    ensure_graph,
    entry_dir,
    export_key,
    sentence_modules,
)

TEXTS = [
    "a",
    "Dog Walking: 10 Simple Steps",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "a " * 300,  # 302 tokens: truncated at the model's 256, as sentence-transformers does
    " ".join(["serving models in batches keeps the machine busy"] * 80),  # > 512 word pieces
    "日本語のテキストと絵文字 😀 ∑ x² ≤ ∞",
    "Привет, мир! Γειά σου κόσμε.",
    "   leading and trailing whitespace   ",
    "https://example.com/path?query=1&other=two#fragment",
]


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    """One cache directory for the session, with the fp32 and int8 graphs exported into it."""
    cache = tmp_path_factory.mktemp("onnx-cache")
    ensure_graph(bundled_model_path(), "fp32", cache)
    ensure_graph(bundled_model_path(), "int8", cache)
    return cache


@pytest.fixture(scope="module")
def fp32(onnx_cache):
    encoder = OnnxEncoder(bundled_model_path(), cache_dir=onnx_cache, threads=1)
    encoder.load()
    return encoder


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(bundled_model_path(), device="cpu", local_files_only=True)


def test_registered_as_onnx():
    assert encoder_class("onnx") is OnnxEncoder


def test_pooling_and_length_come_from_the_models_own_modules():
    modules = sentence_modules(bundled_model_path())
    assert modules == {"pooling": "mean_tokens", "normalize": True, "max_length": 256}


def test_fp32_is_exact_against_sentence_transformers(fp32, reference):
    texts = TEXTS + calibration_texts()[:16]
    expected = reference.encode(texts, convert_to_numpy=True, batch_size=len(texts))
    one_pass = fp32.encode(texts)  # padded to the longest
    singles = np.stack([fp32.encode([text])[0] for text in TEXTS])  # no padding
    assert one_pass.dtype == np.float32 and one_pass.shape == (len(texts), 384)
    assert np.abs(one_pass - expected).max() < 1e-4
    assert np.abs(singles - expected[: len(TEXTS)]).max() < 1e-4


def test_long_texts_are_truncated_as_sentence_transformers_does(fp32, reference):
    long = TEXTS[3]
    counts = fp32.token_counts([long, "a"])
    assert counts == [256, 3]
    vectors, counted = fp32.encode_counted([long, "a"])
    assert counted == counts
    assert np.abs(vectors[0] - reference.encode([long], convert_to_numpy=True)[0]).max() < 1e-4
    cut = reference.tokenizer.decode(reference.tokenizer(long)["input_ids"][1:255])  # what survives truncation
    assert np.abs(fp32.encode([cut])[0] - vectors[0]).max() < 1e-4


def test_describe_names_runtime_precision_and_threads(fp32):
    assert fp32.describe() == {"runtime": "onnx", "device": "cpu", "precision": "fp32", "threads": 1}


def test_int8_passes_its_gate_and_reports_the_cosine(onnx_cache, fp32):
    encoder = OnnxEncoder(bundled_model_path(), cache_dir=onnx_cache, threads=1, quantize="int8")
    encoder.load()
    facts = encoder.describe()
    assert facts["precision"] == "int8"
    gate = facts["quality_gate"]
    assert gate["texts"] == len(calibration_texts()) >= 140
    assert 0.99 <= gate["mean_cosine"] <= 1 and 0.98 <= gate["min_cosine"] <= gate["mean_cosine"]
    vectors = encoder.encode(TEXTS)
    cosine = (vectors * fp32.encode(TEXTS)).sum(axis=1)  # both normalized
    assert cosine.min() > 0.95 and not np.allclose(vectors, fp32.encode(TEXTS), atol=1e-4)  # int8 really runs


def test_int8_below_a_stricter_gate_refuses_naming_the_figures(onnx_cache):
    encoder = OnnxEncoder(
        bundled_model_path(), cache_dir=onnx_cache, threads=1, quantize="int8", min_mean_cosine=0.99999, min_cosine=0.9999
    )
    with pytest.raises(QualityGateError, match=r"mean 0\.99\d\d \(needs >= 0\.99999\), min 0\.9\d+ \(needs >= 0\.9999\)"):
        encoder.load()


def test_a_broken_int8_graph_fails_the_gate(onnx_cache, tmp_path):
    """An int8 file whose weights were damaged (still a valid graph) is refused by the gate."""
    import onnx
    from onnx import numpy_helper

    cache = tmp_path / "cache"
    shutil.copytree(onnx_cache, cache)
    graph = cached_graph(export_key(bundled_model_path(), "int8"), cache)
    model = onnx.load(str(graph))
    rng = np.random.default_rng(0)
    for index, tensor in enumerate(model.graph.initializer):
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.int8 and values.ndim == 2:
            model.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(rng.integers(-127, 127, values.shape, dtype=np.int8), tensor.name)
            )
    onnx.save(model, str(graph))
    manifest = graph.parent / MANIFEST
    facts = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**facts, "bytes": graph.stat().st_size}))  # looks whole: only the gate can tell
    encoder = OnnxEncoder(bundled_model_path(), cache_dir=cache, threads=1, quantize="int8")
    with pytest.raises(QualityGateError, match=r"int8 quality gate failed .* mean -?0\.\d+ \(needs >= 0\.99\)"):
        encoder.load()


def test_the_cache_is_reused(onnx_cache):
    graph = ensure_graph(bundled_model_path(), "fp32", onnx_cache)
    stamp = graph.stat().st_mtime_ns
    assert ensure_graph(bundled_model_path(), "fp32", onnx_cache) == graph
    assert graph.stat().st_mtime_ns == stamp
    assert {path.name for path in graph.parent.iterdir()} == {GRAPH, MANIFEST}
    assert not [path for path in graph.parent.parent.iterdir() if path.name.startswith(".")]  # no temp left


def test_a_truncated_graph_or_missing_manifest_is_not_used(onnx_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(onnx_cache, cache)
    key = export_key(bundled_model_path(), "fp32")
    graph = cached_graph(key, cache)
    size = graph.stat().st_size
    with open(graph, "r+b") as handle:  # killed mid-copy: a prefix of the file
        handle.truncate(size // 2)
    assert cached_graph(key, cache) is None
    (graph.parent / MANIFEST).unlink()
    assert cached_graph(key, cache) is None
    again = ensure_graph(bundled_model_path(), "fp32", cache)  # exported again, whole
    assert again == graph and again.stat().st_size == size and cached_graph(key, cache) == again


def test_a_leftover_temp_dir_is_not_loaded(onnx_cache, tmp_path):
    """A process killed while exporting leaves only its temporary sibling: never read as the entry."""
    cache = tmp_path / "cache"
    key = export_key(bundled_model_path(), "fp32")
    entry = entry_dir(key, cache)
    scratch = entry.parent / f".{entry.name}-killed"
    scratch.mkdir(parents=True)
    shutil.copy(entry_dir(key, onnx_cache) / GRAPH, scratch / GRAPH)
    assert cached_graph(key, cache) is None
    entry.mkdir()  # a directory with a graph but no manifest: also incomplete
    shutil.copy(scratch / GRAPH, entry / GRAPH)
    assert cached_graph(key, cache) is None


def test_another_versions_entry_is_not_loaded(onnx_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(onnx_cache, cache)
    key = export_key(bundled_model_path(), "fp32")
    assert cached_graph(key, cache) is not None
    for changed in ({"onnxruntime": "0.0.1"}, {"torch": "1.0"}, {"transformers": "1.0"}, {"format": key["format"] + 1}):
        other = {**key, **changed}
        assert entry_dir(other, cache) != entry_dir(key, cache)
        assert cached_graph(other, cache) is None
    # an entry whose manifest was written by another version, under this version's name
    manifest = entry_dir(key, cache) / MANIFEST
    facts = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**facts, "key": {**key, "onnxruntime": "0.0.1"}}))
    assert cached_graph(key, cache) is None


def in_a_fork(encoder, threads: str, texts) -> tuple[bool, bool]:
    """In a forked child told to use ``threads``: (same vectors as here, a session of its own)."""
    expected = encoder.encode(texts)
    parent_session = encoder.session
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.environ["OMP_NUM_THREADS"] = threads
            vectors = encoder.encode(texts)
            same = np.abs(vectors - expected).max() < 1e-6
            own = encoder.session is not parent_session and encoder.threads == int(threads)
            os.write(write, bytes([int(same), int(own)]))
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 2)
    os.waitpid(pid, 0)
    return bool(answer[0]), bool(answer[1])


def test_a_forked_process_keeps_a_single_thread_session_and_reopens_for_more(onnx_cache):
    """After a fork (process backend, gunicorn): one thread given, the parent's session (its
    weights shared); more, a session of its own with that many threads."""
    encoder = OnnxEncoder(bundled_model_path(), cache_dir=onnx_cache)  # threads from OMP_NUM_THREADS
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        encoder.load()
    finally:
        os.environ.pop("OMP_NUM_THREADS") if saved is None else os.environ.update(OMP_NUM_THREADS=saved)
    assert encoder.threads == 1
    assert in_a_fork(encoder, "1", TEXTS[:3]) == (True, False)
    assert in_a_fork(encoder, "2", TEXTS[:3]) == (True, True)


def test_embedding_model_auto_is_onnx_on_cpu_and_quantize_needs_onnx():
    assert EmbeddingModel(device="cpu").runtime_for("cpu") == "onnx"
    assert EmbeddingModel(device="cuda").runtime_for("cuda") == "torch"
    assert EmbeddingModel(runtime="torch").runtime_for("cpu") == "torch"
    with pytest.raises(ValueError, match="needs the onnx runtime"):
        EmbeddingModel(device="cpu", runtime="torch", quantize="int8").load()
    with pytest.raises(ValueError, match="CPU only"):
        OnnxEncoder(bundled_model_path(), device="cuda")
