"""`make bench`: batchserve's /v1/embeddings against its ceiling and the naive baseline, in one run.

1. raw: in-process ``encode`` on batches of 64 (the ceiling: no HTTP, no JSON);
2. naive: a FastAPI endpoint encoding one request at a time (benchmarks/peers/naive.py);
3. batchserve `serve --app embeddings` (thread backend, max batch 64).

HTTP load comes from `batchserve bench` in a separate process on loopback, one sentence
per request (a quarter of them long), after a short warm-up.  Targets (issue 2):
c=64 throughput >= 85 % of raw, and c=1 p50 <= naive c=1 p50 + 3 ms.
The figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from harness import PEERS, LoadAverage, Server, append_results, drive, errors, latency, machine, markdown_table, mean_batch, now_utc, raw_encode

THROUGHPUT_TARGET = 0.85  # batchserve at c=64 / raw batch-64
LATENCY_TARGET_MS = 3.0  # batchserve c=1 p50 - naive c=1 p50


def measure(duration: float) -> dict:
    print(f"raw encode, batch 64, {duration:g} s ...", file=sys.stderr)
    raw = raw_encode(duration)
    naive_cmd = [sys.executable, str(PEERS / "naive.py")]
    batchserve_cmd = [sys.executable, "-m", "batchserve.cli", "serve", "--app", "embeddings", "--max-batch-size", "64"]
    http = {}
    with Server("naive", naive_cmd) as server:
        for concurrency in (1, 64):
            print(f"naive, c={concurrency} ...", file=sys.stderr)
            http[("naive", concurrency)] = drive(server.url, concurrency, duration)
    with Server("batchserve", batchserve_cmd) as server:
        for concurrency in (1, 64):
            print(f"batchserve, c={concurrency} ...", file=sys.stderr)
            http[("batchserve", concurrency)] = drive(server.url, concurrency, duration)
    return {"raw": raw, "http": http}


def targets(figures: dict) -> dict:
    raw = figures["raw"]["sentences_per_s"]
    http = figures["http"]
    ratio = http[("batchserve", 64)]["throughput"] / raw
    extra_ms = latency(http[("batchserve", 1)], "p50") - latency(http[("naive", 1)], "p50")
    return {
        "throughput_ratio": ratio,
        "throughput_met": ratio >= THROUGHPUT_TARGET,
        "p50_extra_ms": extra_ms,
        "latency_met": extra_ms <= LATENCY_TARGET_MS,
    }


def section(figures: dict, verdict: dict, command: str, duration: float, load: LoadAverage) -> str:
    raw = figures["raw"]
    rows = [["raw encode (in-process)", "batch 64", raw["sentences_per_s"], None, None, None, "0", 64]]
    for (system, concurrency), summary in figures["http"].items():
        rows.append([
            f"{system} /v1/embeddings", f"c={concurrency}", summary["throughput"], latency(summary, "p50"),
            latency(summary, "p95"), latency(summary, "p99"), errors(summary), mean_batch(summary),
        ])
    table = markdown_table(["system", "load", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch"], rows)
    met = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    return f"""
## make bench — {now_utc()}

- command: `{command}`
- machine: {machine()}; {load.line()}
- load: `batchserve bench` in a separate process on loopback, one sentence per request (a quarter
  long), {duration:g} s per point after a 2 s warm-up; raw = `SentenceTransformer.encode` on batches of 64
  of the same sentences ({raw['batch_ms_p50']:.0f} ms per batch)

{table}

- c=64 throughput / raw batch-64: **{verdict['throughput_ratio']:.0%}** (target ≥ {THROUGHPUT_TARGET:.0%}): {met(verdict['throughput_met'])}
- c=1 p50 − naive c=1 p50: **{verdict['p50_extra_ms']:+.1f} ms** (target ≤ +{LATENCY_TARGET_MS:g} ms): {met(verdict['latency_met'])}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured point")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    load = LoadAverage()
    figures = measure(args.duration)
    verdict = targets(figures)
    command = "make bench" + (f"  # benchmarks/bench_core.py --duration {args.duration:g}" if args.duration != 10 else "")
    text = section(figures, verdict, command, args.duration, load)
    print(text)
    print(json.dumps(verdict))
    if not args.no_write:
        append_results(text)


if __name__ == "__main__":
    main()
