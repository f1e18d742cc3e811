"""What an autoscaler should watch: a redis front's backlog gauges under load, scaled from zero.

One redis-server, one front (`serve --backend redis --wait-for-workers`, /v1/embeddings), a
closed-loop load from `batchserve bench` (one sentence per request) started with no worker
up; a first `batchserve worker` is started a few seconds in, a second one later.  /metrics is
scraped every 0.25 s all along: `batchserve_stream_entries` (XLEN), `batchserve_stream_pending`
(XPENDING) and `batchserve_stream_workers`.  A worker reads the stream only while it has a
free slot, so the batches waiting for capacity are in the stream's length and not pending:
the figures show how far apart the two are, phase by phase.  Written to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack

import httpx
from bench_redis import redis_server, worker
from harness import ENV, ROOT, LoadAverage, Server, errors, latency, machine, markdown_table, now_utc, publish

MODEL = "all-MiniLM-L6-v2"
GAUGES = ("entries", "pending", "workers")


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    found = {}
    for name in GAUGES:
        match = re.search(rf'^batchserve_stream_{name}{{model="{MODEL}"}} (\S+)$', text, re.M)
        if match:
            found[name] = float(match.group(1))
    return found


def sample_until(url: str, stop: threading.Event, samples: list, started: float) -> None:
    while not stop.is_set():
        try:
            figures = scrape(url)
        except httpx.HTTPError:
            figures = {}
        if len(figures) == len(GAUGES):
            samples.append((time.monotonic() - started, figures))
        stop.wait(0.25)


def measure(duration: float, concurrency: int, first: float, second: float) -> tuple[list, dict, dict]:
    samples: list[tuple[float, dict]] = []
    started_at: dict[str, float] = {}
    stop = threading.Event()
    with redis_server() as url, ExitStack() as stack:
        front = stack.enter_context(Server("backlog-front", [
            sys.executable, "-m", "batchserve.cli", "serve", "--app", "embeddings", "--backend", "redis",
            "--redis-url", url, "--wait-for-workers", "--timeout", "60", "--drain-seconds", "0",
        ]))
        command = [sys.executable, "-m", "batchserve.cli", "bench", f"{front.url}/v1/embeddings", "--app", "embeddings",
                   "--concurrency", str(concurrency), "--duration", str(duration), "--timeout", "60", "--json"]
        started = time.monotonic()
        load = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        sampler = threading.Thread(target=sample_until, args=(front.url, stop, samples, started))
        sampler.start()
        try:
            for name, at in (("first worker", first), ("second worker", second)):
                time.sleep(max(at - (time.monotonic() - started), 0))
                started_at[name] = time.monotonic() - started
                print(f"{started_at[name]:.1f} s: starting the {name}", file=sys.stderr)
                stack.enter_context(worker(url, "--threads-per-worker", "1"))
            output, _ = load.communicate(timeout=duration + 120)
        finally:
            stop.set()
            sampler.join()
            if load.poll() is None:
                load.kill()
                load.wait()
    return samples, started_at, json.loads(output)


def phases(samples: list) -> list[list]:
    rows = []
    for workers in (0, 1, 2):
        figures = [figures for _, figures in samples if figures["workers"] == workers]
        if not figures:
            continue
        times = [t for t, f in samples if f["workers"] == workers]
        entries = [f["entries"] for f in figures]
        pending = [f["pending"] for f in figures]
        waiting = [e - p for e, p in zip(entries, pending)]
        rows.append([
            workers, f"{min(times):.1f}–{max(times):.1f}", len(figures),
            statistics.mean(entries), max(entries), statistics.mean(pending), max(pending),
            f"{sum(w > 0 for w in waiting) / len(waiting):.0%}",
            f"{sum(p == 0 and e > 0 for e, p in zip(entries, pending)) / len(figures):.0%}",
        ])
    return rows


def section(samples: list, started_at: dict, summary: dict, command: str, load: LoadAverage, concurrency: int) -> str:  # noqa: E501
    header = ["live workers", "seconds", "samples", "entries (mean)", "entries (max)", "pending (mean)",
              "pending (max)", "samples with unread entries", "samples pending 0, entries > 0"]
    up = {workers: next((t for t, f in samples if f["workers"] >= workers), None) for workers in (1, 2)}
    timeline = ", ".join(f"{name} started at {at:.1f} s" for name, at in started_at.items())
    leases = ", ".join(f"{n} live at {t:.1f} s" for n, t in up.items() if t is not None)
    return f"""
## Backlog gauges under load, scaled from zero — {now_utc()}

- command: `{command}`
- machine: {machine()}; {load.line()}
- one redis-server, one front (`serve --app embeddings --backend redis --wait-for-workers --timeout 60`),
  `batchserve bench` c={concurrency} on /v1/embeddings (one sentence a request) started with no worker up;
  {timeline} (`batchserve worker --threads-per-worker 1`; {leases}); /metrics scraped every 0.25 s
- load: {summary['ok']} answered, errors {errors(summary)}, {summary['throughput']:.1f} req/s over the run,
  p50 {latency(summary, 'p50'):.0f} ms, p99 {latency(summary, 'p99'):.0f} ms (the first requests waited for the first worker)

{markdown_table(header, phases(samples))}

Entries are batches the front wrote (`XLEN`: waiting or being computed; deleted once answered);
pending (`XPENDING`) are those a worker read and has not answered. With no worker, everything
waits and nothing is pending: an autoscaler watching pending (KEDA's lag, or XPENDING) sees 0
and never starts the first worker. With workers up, pending counts only what the workers hold
(a worker reads while it has a free slot); the batches waiting for capacity sit unread in the
stream, counted by its length alone. The length is the signal. It counts the front's batches,
not requests: the front merges the requests that wait together into one entry (up to
`--max-batch-size` items), so c={concurrency} with no worker up is one entry or two.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--first", type=float, default=5.0, help="seconds into the load when the first worker starts")
    parser.add_argument("--second", type=float, default=25.0, help="... and the second")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args()
    load = LoadAverage()
    samples, started_at, summary = measure(args.duration, args.concurrency, args.first, args.second)
    command = (f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/backlog.py --duration {args.duration:g} "
               f"--concurrency {args.concurrency} --first {args.first:g} --second {args.second:g}")
    publish(section(samples, started_at, summary, command, load, args.concurrency), write=not args.no_write)


if __name__ == "__main__":
    main()
