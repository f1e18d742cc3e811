"""Process backend vs thread backend on /v1/embeddings, side by side in one run.

Three servers, one after the other, each `batchserve serve --app embeddings --max-batch-size 64`:
the thread backend, the process backend with 1 worker and with 2 workers (forked from a
front that loaded the model once; torch threads per worker = cores // workers).  Load comes
from `batchserve bench` in a separate process on loopback, one sentence per request, at
c=1 (latency: the cost of the pipe hop) and c=64 (throughput), after a short warm-up.
The figures, with ratios to the thread backend, go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys

from harness import LoadAverage, Server, drive, errors, latency, machine, markdown_table, mean_batch, now_utc, publish

CONFIGS = {  # name -> extra `batchserve serve` arguments
    "thread": ["--backend", "thread"],
    "process, 1 worker": ["--backend", "process", "--workers", "1"],
    "process, 2 workers": ["--backend", "process", "--workers", "2"],
}
LOADS = (1, 64)


def measure(duration: float) -> dict:
    figures = {}
    for name, extra in CONFIGS.items():
        command = [sys.executable, "-m", "batchserve.cli", "serve", "--app", "embeddings", "--max-batch-size", "64", *extra]
        with Server(name.replace(" ", "-").replace(",", ""), command) as server:
            for concurrency in LOADS:
                print(f"{name}, c={concurrency} ...", file=sys.stderr)
                figures[(name, concurrency)] = drive(server.url, concurrency, duration)
    return figures


def section(figures: dict, load: str, command: str, duration: float) -> str:
    rows = []
    for (name, concurrency), summary in figures.items():
        baseline = figures[("thread", concurrency)]
        rows.append([
            name, f"c={concurrency}", summary["throughput"], f"{summary['throughput'] / baseline['throughput']:.2f}×",
            latency(summary, "p50"), latency(summary, "p95"), latency(summary, "p99"), errors(summary), mean_batch(summary),
        ])
    header = ["backend", "load", "req/s", "vs thread", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch"]
    return f"""
## Process backend vs thread backend, /v1/embeddings — {now_utc()}

- command: `{command}`
- machine: {machine()} (shared with other jobs while measured: compare rows of this table only); {load}
- servers: `batchserve serve --app embeddings --max-batch-size 64` with `--backend thread`,
  `--backend process --workers 1`, `--backend process --workers 2`; load: `batchserve bench` in a
  separate process on loopback, one sentence per request, {duration:g} s per point after a 2 s warm-up

{markdown_table(header, rows)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured point")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    load = LoadAverage()
    figures = measure(args.duration)
    command = "python benchmarks/bench_process.py" + (f" --duration {args.duration:g}" if args.duration != 10 else "")
    publish(section(figures, load.line(), command, args.duration), write=not args.no_write)


if __name__ == "__main__":
    main()
