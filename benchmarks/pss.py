"""Memory of the process backend: total PSS of the server with 1 and 4 worker processes.

CPU workers fork from a front that loaded the model once, so the weights are shared
copy-on-write.  PSS (``/proc/PID/smaps_rollup``) charges each shared page to its sharers
in equal parts, so the PSS of the front plus its workers adds up to the memory the whole
server really uses.  Each server is warmed up by `batchserve bench` first (every worker
has run batches: the steady state, not the empty one).  Target (issue 3): 4 workers use at
most 1.5x the memory of 1.  The table goes to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx
from harness import LoadAverage, Server, drive, machine, markdown_table, now_utc, publish

from batchserve.procinfo import descendants, pss_bytes

TARGET = 1.5  # total PSS with 4 workers / with 1
MIB = 2**20

CONFIGS = {  # name -> extra `batchserve serve` arguments
    "thread backend": ["--backend", "thread"],
    "process, 1 worker": ["--backend", "process", "--workers", "1"],
    "process, 4 workers": ["--backend", "process", "--workers", "4"],
}


def measure(name: str, extra: list[str], warmup: float) -> dict:
    command = [sys.executable, "-m", "batchserve.cli", "serve", "--app", "embeddings", *extra]
    with Server(name.replace(" ", "-").replace(",", ""), command) as server:
        drive(server.url, concurrency=16, duration=warmup, warmup=0)
        workers = httpx.get(server.url + "/readyz").json()
        time.sleep(1.0)  # let freed batch buffers settle
        front = server.process.pid
        children = descendants(front)
        samples = [(pss_bytes(front), sum(pss_bytes(child) for child in children)) for _ in range(3)]
        front_pss = min(sample[0] for sample in samples)
        workers_pss = min(sample[1] for sample in samples)
    return {
        "processes": 1 + len(children),
        "front_mib": front_pss / MIB,
        "workers_mib": workers_pss / MIB,
        "total_mib": (front_pss + workers_pss) / MIB,
        "readyz": workers,
    }


def section(figures: dict, load: str, command: str, warmup: float) -> str:
    one = figures["process, 1 worker"]["total_mib"]
    four = figures["process, 4 workers"]["total_mib"]
    rows = [
        [name, f["processes"], f["front_mib"], f["workers_mib"], f["total_mib"], f"{f['total_mib'] / one:.2f}×"]
        for name, f in figures.items()
    ]
    table = markdown_table(["server", "processes", "front PSS MiB", "workers PSS MiB", "total PSS MiB", "vs 1 worker"], rows)
    ratio = four / one
    verdict = "met" if ratio <= TARGET else "**missed**"
    return f"""
## Process backend memory (PSS) — {now_utc()}

- command: `{command}`
- machine: {machine()} (shared with other jobs while measured); {load}
- each server: `batchserve serve --app embeddings ...` (all-MiniLM-L6-v2), warmed up by `batchserve bench`
  (c=16, {warmup:g} s), then PSS summed over the server and its worker processes from
  `/proc/PID/smaps_rollup` (the lowest of 3 readings)

{table}

- 4 workers / 1 worker: **{ratio:.2f}×** (target ≤ {TARGET}×): {verdict}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before measuring")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    load = LoadAverage()
    figures = {}
    for name, extra in CONFIGS.items():
        print(f"{name} ...", file=sys.stderr)
        figures[name] = measure(name, extra, args.warmup)
    command = "python benchmarks/pss.py" + (f" --warmup {args.warmup:g}" if args.warmup != 10.0 else "")
    publish(section(figures, load.line(), command, args.warmup), write=not args.no_write)


if __name__ == "__main__":
    main()
