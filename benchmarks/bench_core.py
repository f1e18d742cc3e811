"""`make bench`: batchserve's /v1/embeddings against its ceiling and the naive baseline, in one run.

1. raw: in-process ``encode`` on batches of 64 (the ceiling: no HTTP, no JSON);
2. naive: a FastAPI endpoint encoding one request at a time (benchmarks/peers/naive.py);
3. batchserve `serve --app embeddings` (thread backend, max batch 64).

HTTP load comes from `batchserve bench` in a separate process on loopback, one sentence
per request (a quarter of them long).  The points are measured in interleaved rounds, so
that other load on a shared machine weighs on every system alike.  Targets (issue 2):
c=64 throughput >= 85 % of raw, and c=1 p50 <= naive c=1 p50 + 3 ms.
The figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from harness import (
    PEERS,
    LoadAverage,
    RawEncoder,
    Server,
    drive,
    errors,
    latency,
    machine,
    markdown_table,
    mean_batch,
    merge_rounds,
    now_utc,
    publish,
)

THROUGHPUT_TARGET = 0.85  # batchserve at c=64 / raw batch-64
LATENCY_TARGET_MS = 3.0  # batchserve c=1 p50 - naive c=1 p50
C1_TURNS = 3  # c=1 points alternate between the servers this many times per round


def measure(duration: float, rounds: int) -> dict:
    """Raw, naive and batchserve in interleaved rounds, so that other load on the machine
    weighs on all of them alike; both servers run throughout (idle when not driven)."""
    naive_cmd = [sys.executable, str(PEERS / "naive.py")]
    batchserve_cmd = [sys.executable, "-m", "batchserve.cli", "serve", "--app", "embeddings", "--max-batch-size", "64"]
    share = duration / rounds
    raw_rounds, http_rounds = [], {}
    with Server("naive", naive_cmd) as naive, Server("batchserve", batchserve_cmd) as ours:
        raw = RawEncoder()
        servers = {"naive": naive, "batchserve": ours}
        for number in range(rounds):
            print(f"round {number + 1}/{rounds}: raw encode, batch 64 ...", file=sys.stderr)
            raw_rounds.append(raw.measure(share))
            for concurrency in (1, 64):
                # c=1 latency swings most with other jobs' load: alternate in shorter turns
                turns = C1_TURNS if concurrency == 1 else 1
                for turn in range(turns):
                    for name, server in servers.items():
                        print(f"round {number + 1}/{rounds}: {name}, c={concurrency} ...", file=sys.stderr)
                        warmup = 2.0 if number == 0 and turn == 0 else 0.0
                        summary = drive(server.url, concurrency, share / turns, warmup=warmup)
                        http_rounds.setdefault((name, concurrency), []).append(summary)
    raw_figures = {
        "sentences_per_s": float(np.mean([r["sentences_per_s"] for r in raw_rounds])),
        "batch_ms_p50": float(np.median([r["batch_ms_p50"] for r in raw_rounds])),
    }
    return {"raw": raw_figures, "http": {key: merge_rounds(values) for key, values in http_rounds.items()}}


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


def section(figures: dict, verdict: dict, command: str, duration: float, rounds: int, load: LoadAverage) -> str:
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
  long); raw = `SentenceTransformer.encode` on batches of 64 of the same sentences ({raw['batch_ms_p50']:.0f} ms
  per batch). {duration:g} s per point, split into {rounds} interleaved rounds (raw, then each server in
  turn at c=1 ({C1_TURNS} alternating turns each), then at c=64; both servers up throughout, a 2 s
  warm-up before the first round): req/s is the mean over the turns, latencies the median of their figures

{table}

- c=64 throughput / raw batch-64: **{verdict['throughput_ratio']:.0%}** (target ≥ {THROUGHPUT_TARGET:.0%}): {met(verdict['throughput_met'])}
- c=1 p50 − naive c=1 p50: **{verdict['p50_extra_ms']:+.1f} ms** (target ≤ +{LATENCY_TARGET_MS:g} ms): {met(verdict['latency_met'])}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per measured point, over all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds the points are split into")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    load = LoadAverage()
    figures = measure(args.duration, args.rounds)
    verdict = targets(figures)
    defaults = args.duration == 12 and args.rounds == 3
    command = "make bench" + ("" if defaults else f"  # benchmarks/bench_core.py --duration {args.duration:g} --rounds {args.rounds}")
    publish(section(figures, verdict, command, args.duration, args.rounds, load), write=not args.no_write)
    print(json.dumps(verdict))


if __name__ == "__main__":
    main()
