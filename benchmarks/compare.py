"""`make bench-compare`: batchserve against what users would pick instead, on one machine and model.

Each system is started in turn on loopback and driven with the same load (`batchserve bench`
in a separate process, one sentence per request, a quarter of them long) at concurrency
1, 16, 64 and 256:

* raw — in-process ``encode`` on batches of min(c, 64): the ceiling (no HTTP, no JSON);
* naive — FastAPI encoding one request at a time (peers/naive.py);
* service-streamer — ThreadedStreamer, batch 64, max latency 0.1 s (peers/streamer.py);
* LitServe — its own batching, max batch 64 (peers/litserve_server.py);
* batchserve — thread backend, and process backend with one worker per core.

Writes a table to benchmarks/RESULTS.md and a plot (req/s and p99 against concurrency) to
benchmarks/compare.png.  Targets (issue 6), in the same run: batchserve at c=64 >= 3.5x
LitServe and >= 3.5x service-streamer; c=1 p50 within 3 ms of naive.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from pathlib import Path

from harness import PEERS, LoadAverage, Server, append_results, drive, errors, latency, machine, markdown_table, mean_batch, now_utc, raw_encode

CONCURRENCY = (1, 16, 64, 256)
MAX_BATCH = 64
PLOT = Path(__file__).resolve().parent / "compare.png"
SPEEDUP_TARGET = 3.5
LATENCY_TARGET_MS = 3.0

PYTHON = sys.executable
BATCHSERVE = [PYTHON, "-m", "batchserve.cli", "serve", "--app", "embeddings", "--max-batch-size", str(MAX_BATCH)]
SYSTEMS = {  # name -> (command, readiness path)
    "naive FastAPI": ([PYTHON, str(PEERS / "naive.py")], "/readyz"),
    "service-streamer": ([PYTHON, str(PEERS / "streamer.py")], "/readyz"),
    "LitServe": ([PYTHON, str(PEERS / "litserve_server.py")], "/health"),
    "batchserve thread": ([*BATCHSERVE, "--backend", "thread"], "/readyz"),
    "batchserve process": ([*BATCHSERVE, "--backend", "process", "--workers", str(os.cpu_count() or 1)], "/readyz"),
}
RAW = "raw encode (ceiling)"


def measure_raw(duration: float) -> dict[int, dict]:
    rows = {}
    for concurrency in CONCURRENCY:
        batch = min(concurrency, MAX_BATCH)
        print(f"{RAW}, batch {batch} ...", file=sys.stderr)
        raw = raw_encode(duration, batch_size=batch)
        rows[concurrency] = {
            "throughput": raw["sentences_per_s"],
            "latency_ms": {"p50": raw["batch_ms_p50"], "p99": raw["batch_ms_p99"]},
            "errors": {},
            "batch_sizes": None,
        }
    return rows


def measure_system(name: str, duration: float) -> dict[int, dict] | str:
    """Figures per concurrency, or why the system could not be measured."""
    command, ready_path = SYSTEMS[name]
    try:
        with Server(name.replace(" ", "-"), command, ready_path=ready_path) as server:
            rows = {}
            for concurrency in CONCURRENCY:
                print(f"{name}, c={concurrency} ...", file=sys.stderr)
                rows[concurrency] = drive(server.url, concurrency, duration)
            return rows
    except (RuntimeError, TimeoutError) as error:
        print(f"{name}: {error}", file=sys.stderr)
        return str(error)


def verdict(results: dict) -> dict:
    out = {}
    ours = results.get("batchserve thread")
    if not isinstance(ours, dict):
        return out
    for peer in ("LitServe", "service-streamer"):
        theirs = results.get(peer)
        if isinstance(theirs, dict) and theirs[64]["throughput"] > 0:
            ratio = ours[64]["throughput"] / theirs[64]["throughput"]
            out[f"c=64 vs {peer}"] = (f"{ratio:.2f}×", ratio >= SPEEDUP_TARGET, f"≥ {SPEEDUP_TARGET}×")
    naive = results.get("naive FastAPI")
    if isinstance(naive, dict) and latency(naive[1], "p50") is not None and latency(ours[1], "p50") is not None:
        extra = latency(ours[1], "p50") - latency(naive[1], "p50")
        out["c=1 p50 − naive p50"] = (f"{extra:+.1f} ms", extra <= LATENCY_TARGET_MS, f"≤ +{LATENCY_TARGET_MS:g} ms")
    return out


def versions() -> str:
    names = ("torch", "sentence-transformers", "fastapi", "uvicorn", "httpx", "litserve", "service-streamer")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def section(results: dict, checks: dict, command: str, duration: float, load: LoadAverage) -> str:
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
        style = "--" if name == RAW else "-"
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
    parser.add_argument("--only", action="append", choices=[RAW, *SYSTEMS], help="measure only these (repeatable)")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md or the plot")
    args = parser.parse_args()
    chosen = args.only or [RAW, *SYSTEMS]
    load = LoadAverage()
    results: dict = {}
    if RAW in chosen:
        results[RAW] = measure_raw(args.duration)
    for name in SYSTEMS:
        if name in chosen:
            results[name] = measure_system(name, args.duration)
    checks = verdict(results)
    command = "make bench-compare" + (f"  # benchmarks/compare.py --duration {args.duration:g}" if args.duration != 8 else "")
    text = section(results, checks, command, args.duration, load)
    print(text)
    print(json.dumps({name: [value, ok] for name, (value, ok, _) in checks.items()}, ensure_ascii=False))
    if not args.no_write:
        plot(results, PLOT)
        append_results(text)


if __name__ == "__main__":
    main()
