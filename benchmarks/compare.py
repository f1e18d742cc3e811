"""`make bench-compare`: batchserve against what users would pick instead, on one machine and model.

Each system is started in turn on loopback and driven with the same load (`batchserve bench`
in a separate process, one sentence per request, a quarter of them long) at concurrency
1, 16, 64 and 256:

* raw — in-process ``encode`` on batches of min(c, 64), no HTTP, no JSON: torch fp32
  (sentence-transformers, one padded pass), and batchserve's ONNX runtime fp32 and int8
  (all cores in one process, length-sorted passes within the server's token budget);
* naive — FastAPI encoding one request at a time (peers/naive.py);
* service-streamer — ThreadedStreamer, batch 64, max latency 0.1 s (peers/streamer.py);
* LitServe — its own batching, max batch 64 (peers/litserve_server.py);
* Infinity 0.0.78 — its torch engine, and its optimum engine on an int8 ONNX file made with
  optimum (peers/infinity_models.py), in its own venv (``INFINITY_VENV``, default
  ``.venv-infinity``, made by ``make bench-compare``: its pins conflict with ours);
* batchserve — the default layout (``serve`` with no backend given), ``--quantize int8``, the
  thread backend, and the process backend with one worker per core.

Writes a table to benchmarks/RESULTS.md and a plot (req/s and p99 against concurrency) to
benchmarks/compare.png.  Targets, in the same run: issue 6: batchserve at c=64 >= 3.5x
LitServe and >= 3.5x service-streamer, c=1 p50 within 3 ms of naive; issue 11: the default
at c=64 >= 1.0x Infinity int8 and >= 85 % of raw ONNX fp32, its c=1 p50 no worse than
Infinity int8's, ``--quantize int8`` at c=64 >= 1.5x Infinity int8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np
from harness import (
    ENV,
    PEERS,
    ROOT,
    LoadAverage,
    Server,
    append_results,
    drive,
    errors,
    latency,
    machine,
    markdown_table,
    mean_batch,
    now_utc,
    raw_encode,
)

CONCURRENCY = (1, 16, 64, 256)
MAX_BATCH = 64
PLOT = Path(__file__).resolve().parent / "compare.png"
SPEEDUP_TARGET = 3.5
LATENCY_TARGET_MS = 3.0

PYTHON = sys.executable
BATCHSERVE = [PYTHON, "-m", "batchserve.cli", "serve", "--app", "embeddings", "--max-batch-size", str(MAX_BATCH)]
INFINITY_VENV = Path(os.environ.get("INFINITY_VENV", ROOT / ".venv-infinity"))
INFINITY_MODELS = ROOT / "benchmarks" / "out" / "infinity-models"
SERVED = "all-MiniLM-L6-v2"


def infinity(engine: str, *extra: str) -> list[str]:
    return [str(INFINITY_VENV / "bin" / "infinity_emb"), "v2", "--served-model-name", SERVED, "--engine", engine,
            "--device", "cpu", "--batch-size", str(MAX_BATCH), "--host", "127.0.0.1", *extra]


def bundled_model() -> str:
    from batchserve.apps.embeddings import bundled_model_path

    return str(bundled_model_path())


# name -> (command, readiness path, working directory, embeddings path); commands are built late
SYSTEMS = {
    "naive FastAPI": (lambda: [PYTHON, str(PEERS / "naive.py")], "/readyz", ROOT, "/v1/embeddings"),
    "service-streamer": (lambda: [PYTHON, str(PEERS / "streamer.py")], "/readyz", ROOT, "/v1/embeddings"),
    "LitServe": (lambda: [PYTHON, str(PEERS / "litserve_server.py")], "/health", ROOT, "/v1/embeddings"),
    "Infinity torch": (lambda: infinity("torch", "--model-id", bundled_model()), "/health", ROOT, "/embeddings"),
    # its optimum engine loads the ONNX file at the top of a local directory given as "."
    "Infinity int8": (lambda: infinity("optimum", "--model-id", ".", "--pooling-method", "mean"), "/health",
                      INFINITY_MODELS / "int8", "/embeddings"),
    "batchserve default": (lambda: BATCHSERVE, "/readyz", ROOT, "/v1/embeddings"),
    "batchserve int8": (lambda: [*BATCHSERVE, "--quantize", "int8"], "/readyz", ROOT, "/v1/embeddings"),
    "batchserve thread": (lambda: [*BATCHSERVE, "--backend", "thread"], "/readyz", ROOT, "/v1/embeddings"),
    "batchserve process": (lambda: [*BATCHSERVE, "--backend", "process", "--workers", str(os.cpu_count() or 1)],
                           "/readyz", ROOT, "/v1/embeddings"),
}
RAW = "raw torch fp32"
RAWS = {  # name -> RawEncoder options
    RAW: {"runtime": "sentence-transformers"},
    "raw ONNX fp32": {"runtime": "onnx", "quantize": "none"},
    "raw ONNX int8": {"runtime": "onnx", "quantize": "int8"},
}


def prepare_infinity() -> str | None:
    """Make Infinity's ONNX model directories (once); None, or why Infinity cannot run."""
    python = INFINITY_VENV / "bin" / "python"
    if not python.exists():
        return f"no Infinity venv at {INFINITY_VENV} (make bench-compare makes it)"
    done = subprocess.run([str(python), str(PEERS / "infinity_models.py"), bundled_model(), str(INFINITY_MODELS)],
                          env=ENV, capture_output=True, text=True)
    return None if done.returncode == 0 else f"preparing its ONNX files failed: {done.stderr[-500:]}"


def embedding_agreement(url: str) -> str:
    """Cosine of a server's embeddings against sentence-transformers on the calibration texts."""
    from sentence_transformers import SentenceTransformer

    from batchserve.runtimes.onnx.encoder import calibration_texts

    texts = calibration_texts()
    reference = SentenceTransformer(bundled_model(), device="cpu", local_files_only=True).encode(texts)
    rows = []
    for start in range(0, len(texts), 32):
        body = {"input": texts[start : start + 32], "model": SERVED}
        answer = httpx.post(url, json=body, timeout=120).raise_for_status().json()
        rows += [row["embedding"] for row in sorted(answer["data"], key=lambda row: row["index"])]
    got = np.asarray(rows, dtype=np.float32)
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    want = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cosine = (got * want).sum(axis=1)
    return f"mean {cosine.mean():.4f}, min {cosine.min():.4f} over {len(texts)} texts"


def measure_raw(name: str, duration: float) -> dict[int, dict]:
    rows = {}
    for concurrency in CONCURRENCY:
        batch = min(concurrency, MAX_BATCH)
        print(f"{name}, batch {batch} ...", file=sys.stderr)
        raw = raw_encode(duration, batch_size=batch, **RAWS[name])
        rows[concurrency] = {
            "throughput": raw["sentences_per_s"],
            "latency_ms": {"p50": raw["batch_ms_p50"], "p99": raw["batch_ms_p99"]},
            "errors": {},
            "batch_sizes": None,
        }
    return rows


def measure_system(name: str, duration: float, agreement: dict[str, str]) -> dict[int, dict] | str:
    """Figures per concurrency, or why the system could not be measured."""
    command, ready_path, cwd, path = SYSTEMS[name]
    if name.startswith("Infinity") and (missing := prepare_infinity()):
        print(f"{name}: {missing}", file=sys.stderr)
        return missing
    try:
        with Server(name.replace(" ", "-"), command(), ready_path=ready_path, cwd=cwd, ready_timeout=600) as server:
            if name.startswith("Infinity"):
                agreement[name] = embedding_agreement(server.url + path)
            rows = {}
            for concurrency in CONCURRENCY:
                print(f"{name}, c={concurrency} ...", file=sys.stderr)
                rows[concurrency] = drive(server.url, concurrency, duration, path=path)
            return rows
    except (RuntimeError, TimeoutError, httpx.HTTPError) as error:
        print(f"{name}: {error}", file=sys.stderr)
        return str(error)


def _ratio(results: dict, ours: str, theirs: str, c: int = 64) -> float | None:
    a, b = results.get(ours), results.get(theirs)
    if isinstance(a, dict) and isinstance(b, dict) and b[c]["throughput"] > 0:
        return a[c]["throughput"] / b[c]["throughput"]
    return None


def verdict(results: dict) -> dict:
    out = {}
    ours = "batchserve default"
    if not isinstance(results.get(ours), dict):
        return out
    for peer in ("LitServe", "service-streamer"):
        if (ratio := _ratio(results, ours, peer)) is not None:
            out[f"c=64 vs {peer}"] = (f"{ratio:.2f}×", ratio >= SPEEDUP_TARGET, f"≥ {SPEEDUP_TARGET}×")
    naive = results.get("naive FastAPI")
    p50 = latency(results[ours][1], "p50")
    if isinstance(naive, dict) and latency(naive[1], "p50") is not None and p50 is not None:
        extra = p50 - latency(naive[1], "p50")
        out["c=1 p50 − naive p50"] = (f"{extra:+.1f} ms", extra <= LATENCY_TARGET_MS, f"≤ +{LATENCY_TARGET_MS:g} ms")
    for mine, theirs, target in ((ours, "Infinity int8", 1.0), ("batchserve int8", "Infinity int8", 1.5),
                                 (ours, "raw ONNX fp32", 0.85)):
        if (ratio := _ratio(results, mine, theirs)) is not None:
            out[f"c=64 {mine} vs {theirs}"] = (f"{ratio:.2f}×", ratio >= target, f"≥ {target:g}×")
    peer = results.get("Infinity int8")
    if isinstance(peer, dict) and latency(peer[1], "p50") is not None and p50 is not None:
        theirs = latency(peer[1], "p50")
        out["c=1 p50 default vs Infinity int8"] = (f"{p50:.1f} vs {theirs:.1f} ms", p50 <= theirs, "no worse")
    return out


def versions() -> str:
    names = ("batchserve", "torch", "onnxruntime", "sentence-transformers", "fastapi", "uvicorn", "litserve",
             "service-streamer")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    python = INFINITY_VENV / "bin" / "python"
    if python.exists():
        probe = (
            "from importlib.metadata import version as v; "
            "print(f\"infinity-emb {v('infinity-emb')}, its onnxruntime {v('onnxruntime')}, optimum {v('optimum')}\")"
        )
        found.append(subprocess.run([str(python), "-c", probe], capture_output=True, text=True).stdout.strip())
    return ", ".join(found)


def section(results: dict, checks: dict, command: str, duration: float, load: LoadAverage, agreement: dict) -> str:
    pivot, detail = [], []
    for name, rows in results.items():
        if not isinstance(rows, dict):
            pivot.append([name] + ["missing"] * len(CONCURRENCY))
            detail.append([name, "—", None, None, None, f"not measured: {rows}", None])
            continue
        pivot.append([name] + [_cell(rows[c]) for c in CONCURRENCY])
        for c in CONCURRENCY:
            summary = rows[c]
            detail.append([name, c, summary["throughput"], latency(summary, "p50"), latency(summary, "p99"),
                           errors(summary), mean_batch(summary)])
    lines = [f"- {name}: **{value}** (target {target}): {'met' if ok else '**missed**'}" for name, (value, ok, target) in checks.items()]
    return f"""
## make bench-compare — {now_utc()}

- command: `{command}`
- machine: {machine()}; {load.line()}
- versions: {versions()}
- load: `batchserve bench` in a separate process on loopback, one sentence per request (a quarter long),
  {duration:g} s per point after a 2 s warm-up; every server gets max batch {MAX_BATCH}; raw is in-process
  `encode` on batches of min(c, {MAX_BATCH}) (its latency is one batch's)
- plot: [compare.png](compare.png)
{"".join(f"- {name}: cosine against sentence-transformers {value}{chr(10)}" for name, value in agreement.items())}
req/s (p99 ms) by concurrency:

{markdown_table(["system", *[f"c={c}" for c in CONCURRENCY]], pivot)}

{chr(10).join(lines) if lines else "- targets: not computed (a system is missing)"}

<details><summary>every point</summary>

{markdown_table(["system", "c", "req/s", "p50 ms", "p99 ms", "errors", "mean batch"], detail)}

</details>
"""


def _cell(summary: dict) -> str:
    p99 = latency(summary, "p99")
    return f"{summary['throughput']:.1f} ({p99:.0f})" if p99 is not None else f"{summary['throughput']:.1f} (—)"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in results.items():
        if not isinstance(rows, dict):
            continue
        style = "--" if name in RAWS else "-"
        left.plot(CONCURRENCY, [rows[c]["throughput"] for c in CONCURRENCY], style, marker="o", label=name)
        p99 = [latency(rows[c], "p99") for c in CONCURRENCY]
        right.plot(CONCURRENCY, [v if v is not None else float("nan") for v in p99], style, marker="o", label=name)
    for axis, title in ((left, "throughput (req/s)"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        axis.set_xlabel("concurrent clients")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    figure.suptitle(f"all-MiniLM-L6-v2 on {os.cpu_count()} CPUs, one sentence per request ({now_utc()})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured point")
    parser.add_argument("--only", action="append", choices=[*RAWS, *SYSTEMS], help="measure only these (repeatable)")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md or the plot")
    args = parser.parse_args()
    chosen = args.only or [*RAWS, *SYSTEMS]
    load = LoadAverage()
    results: dict = {}
    for name in RAWS:
        if name in chosen:
            results[name] = measure_raw(name, args.duration)
    agreement: dict[str, str] = {}
    for name in SYSTEMS:
        if name in chosen:
            results[name] = measure_system(name, args.duration, agreement)
    checks = verdict(results)
    command = "make bench-compare" + (f"  # benchmarks/compare.py --duration {args.duration:g}" if args.duration != 8 else "")
    text = section(results, checks, command, args.duration, load, agreement)
    print(text)
    print(json.dumps({name: [value, ok] for name, (value, ok, _) in checks.items()}, ensure_ascii=False))
    if not args.no_write:
        plot(results, PLOT)
        append_results(text)


if __name__ == "__main__":
    main()
