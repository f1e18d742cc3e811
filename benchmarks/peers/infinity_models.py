"""Prepare all-MiniLM-L6-v2 for Infinity's optimum engine; run with Infinity's own venv's Python.

    .venv-infinity/bin/python benchmarks/peers/infinity_models.py MODEL_DIR OUT_DIR

Writes ``OUT_DIR/fp32`` (``model.onnx``) and ``OUT_DIR/int8`` (``model_quantized.onnx``: the
name must contain "quantize" for Infinity to pick it), each a complete model directory
(config, tokenizer, sentence-transformers pooling files), exported and quantized with
optimum, Infinity's own toolchain.  fp32: the ONNX export with ONNX Runtime's transformer
fusions applied (Infinity's own optimization step fails under optimum 2.1 and falls back
to the file as given, so it gets the fused file).  int8: the plain export quantized
dynamically with per-channel weights by optimum's CPU preset for this CPU (AVX-512 VNNI
when present, else AVX2); quantizing the fused graph fails in ONNX Runtime's shape
inference (its fused operators have no registered types).
Skips the work when the files exist.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

MODEL_FILES = (
    "config.json", "config_sentence_transformers.json", "modules.json", "sentence_bert_config.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "1_Pooling",
)


def copy_model_files(source: Path, target: Path) -> None:
    for name in MODEL_FILES:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, dirs_exist_ok=True)
        elif path.exists():
            shutil.copy2(path, target / name)


def cpu_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as cpuinfo:
        return any(flag in line.split() for line in cpuinfo if line.startswith("flags"))


def main(source: Path, out: Path) -> None:
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig, OptimizationConfig

    fp32, int8, staging = out / "fp32", out / "int8", out / "export"
    if not (staging / "model.onnx").exists():
        ORTModelForFeatureExtraction.from_pretrained(source, export=True).save_pretrained(staging)
    if not (fp32 / "model.onnx").exists():
        try:
            ORTOptimizer.from_pretrained(staging).optimize(OptimizationConfig(optimization_level=2), fp32)
            (fp32 / "model_optimized.onnx").rename(fp32 / "model.onnx")
        except Exception as error:  # noqa: BLE001 - any optimizer failure: the plain export serves
            print(f"optimization failed ({error}); using the plain export", file=sys.stderr)
            shutil.copytree(staging, fp32, dirs_exist_ok=True)
        copy_model_files(source, fp32)
    if not (int8 / "model_quantized.onnx").exists():
        preset = AutoQuantizationConfig.avx512_vnni if cpu_has("avx512_vnni") else AutoQuantizationConfig.avx2
        ORTQuantizer.from_pretrained(staging).quantize(save_dir=int8, quantization_config=preset(is_static=False, per_channel=True))
        copy_model_files(source, int8)
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
