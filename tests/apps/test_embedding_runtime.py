"""Which runtime serves the embeddings, at what precision, and what /readyz says about it; an
int8 model that fails its quality gate keeps the server from starting (exit 3, the figures named)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from batchserve.apps.embeddings import MODEL_NAME, bundled_model_path
from batchserve.runtimes.onnx.encoder import ensure_graph
from tests.conftest import free_port, in_process

TEXTS = ["Dog Walking: 10 Simple Steps", "A much longer sentence about serving models in batches.", "x"]


def model_facts(ready: dict) -> dict:
    return ready["services"]["embeddings"]["models"][MODEL_NAME]["model"]


async def embed(client, texts) -> np.ndarray:
    reply = await client.post("/v1/embeddings", json={"input": texts})
    assert reply.status_code == 200, reply.text
    return np.array([item["embedding"] for item in reply.json()["data"]])


async def test_the_default_is_onnx_fp32_and_readyz_says_so():
    async with in_process(apps=["embeddings"]) as client:
        facts = model_facts((await client.get("/readyz")).json())
        assert facts["runtime"] == "onnx" and facts["precision"] == "fp32" and facts["device"] == "cpu"
        assert facts["threads"] >= 1 and "quality_gate" not in facts
        fp32 = await embed(client, TEXTS)
    from sentence_transformers import SentenceTransformer

    direct = SentenceTransformer(bundled_model_path(), device="cpu", local_files_only=True).encode(TEXTS)
    assert np.abs(fp32 - direct).max() < 1e-4


async def test_torch_runtime_still_serves():
    async with in_process(apps=["embeddings"], runtime="torch") as client:
        facts = model_facts((await client.get("/readyz")).json())
        assert facts == {"runtime": "torch", "device": "cpu", "precision": "fp32"}
        assert (await embed(client, TEXTS)).shape == (3, 384)


async def test_int8_readyz_shows_the_gates_cosine():
    async with in_process(apps=["embeddings"], quantize="int8") as client:
        facts = model_facts((await client.get("/readyz")).json())
        assert facts["runtime"] == "onnx" and facts["precision"] == "int8"
        gate = facts["quality_gate"]
        assert gate["mean_cosine"] >= 0.99 and gate["min_cosine"] >= 0.98
        assert gate["required"] == {"mean": 0.99, "min": 0.98}
        assert (await embed(client, TEXTS)).shape == (3, 384)


async def test_process_workers_report_their_runtime_and_threads():
    async with in_process(apps=["embeddings"], backend="process", workers=2) as client:
        described = (await client.get("/readyz")).json()["services"]["embeddings"]["models"][MODEL_NAME]
        assert described["backend"] == "process" and described["workers_up"] == 2
        assert described["model"]["runtime"] == "onnx" and described["model"]["threads"] >= 1
        assert (await embed(client, TEXTS)).shape == (3, 384)


@pytest.fixture
def broken_int8_cache(tmp_path):
    """A cache directory whose int8 graph is valid but has its weights scrambled."""
    import json

    import onnx
    from onnx import numpy_helper

    int8 = ensure_graph(bundled_model_path(), "int8")  # the default cache (made by earlier loads)
    fp32 = ensure_graph(bundled_model_path(), "fp32")
    cache = tmp_path / "cache"
    for graph in (fp32, int8):
        shutil.copytree(graph.parent, cache / "onnx" / graph.parent.name)
    target = cache / "onnx" / int8.parent.name / int8.name
    model = onnx.load(str(target))
    rng = np.random.default_rng(1)
    for index, tensor in enumerate(model.graph.initializer):
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.int8 and values.ndim == 2:
            scrambled = rng.integers(-127, 127, values.shape, dtype=np.int8)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(scrambled, tensor.name))
    onnx.save(model, str(target))
    manifest = target.parent / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "bytes": target.stat().st_size}))
    return cache


def test_a_failed_gate_keeps_the_server_from_starting(broken_int8_cache):
    env = {**os.environ, "BATCHSERVE_CACHE_DIR": str(broken_int8_cache), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "batchserve.cli", "serve", "--quantize", "int8", "--port", str(free_port())]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "int8 quality gate failed" in done.stderr
    assert "(needs >= 0.99)" in done.stderr and "(needs >= 0.98)" in done.stderr
