"""Redis mode vs the process backend at equal worker count, on /v1/embeddings, in one run.

1. process: `serve --backend process --workers 2` (two supervised model processes);
2. redis, one worker host: `serve --backend redis` + `batchserve worker --workers 2`;
3. redis, two worker hosts: `serve --backend redis` + two `batchserve worker --threads-per-worker 1`.

All on this machine (loopback, one redis-server started here, a prefix per redis setup),
all three up at once, their c=64 measurements interleaved over rounds; every model process
gets cores // 2 torch threads.  Load comes from `batchserve bench` in a separate process, one
sentence per request.  Target (issue 4): redis throughput at c=64 >= 90 % of process.
The figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from harness import ENV, ROOT, LoadAverage, Server, drive, errors, free_port, latency, machine, markdown_table, now_utc, publish

TARGET = 0.90
WORKERS = 2
CONCURRENCIES = (1, 64)


@contextmanager
def redis_server():
    """A redis-server on a free loopback port, without persistence."""
    port = free_port()
    command = [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()


@contextmanager
def worker(url: str, *args: str):
    """`batchserve worker`; its log goes to a temporary file."""
    log_path = Path(tempfile.gettempdir()) / f"batchserve-bench-worker-{free_port()}.log"
    with open(log_path, "wb") as log:
        command = [sys.executable, "-m", "batchserve.cli", "worker", "--redis-url", url, "--app", "embeddings", *args]
        process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_workers(url: str, prefix: str, count: int, timeout: float = 300.0) -> None:
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.zcount(f"batchserve:{prefix}:all-MiniLM-L6-v2:workers", time.time(), "+inf") >= count:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{count} redis workers not up for prefix {prefix!r} after {timeout:g} s")


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchserve.cli", "serve", "--app", "embeddings", "--max-batch-size", "64",
            "--drain-seconds", "0", *args]


#: system → (front's extra serve args, one `batchserve worker` arg list per worker process)
def layouts(url: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    return {
        "process, 2 workers": (["--backend", "process", "--workers", str(WORKERS)], []),
        "redis, 1 worker host × 2 processes": (
            ["--backend", "redis", "--redis-url", url, "--prefix", "one"],
            [["--prefix", "one", "--workers", str(WORKERS)]],
        ),
        "redis, 2 worker hosts × 1 process": (
            ["--backend", "redis", "--redis-url", url, "--prefix", "two"],
            [["--prefix", "two", "--threads-per-worker", "1"]] * WORKERS,
        ),
    }


def measure(duration: float, rounds: int) -> dict[str, dict[int, list[dict]]]:
    """Every system up at once (idle ones cost no CPU); c=64 points interleaved over rounds."""
    figures: dict[str, dict[int, list[dict]]] = {}
    with redis_server() as url, ExitStack() as stack:
        systems = layouts(url)
        for _, worker_args in systems.values():
            for args in worker_args:
                stack.enter_context(worker(url, *args))
        for _, worker_args in systems.values():
            if worker_args:
                wait_for_workers(url, worker_args[0][1], len(worker_args))
        servers = {
            name: stack.enter_context(Server(f"front-{index}", serve_command(*front_args)))
            for index, (name, (front_args, _)) in enumerate(systems.items())
        }
        for round_number in range(rounds):
            for name, server in servers.items():
                print(f"round {round_number + 1}/{rounds}: {name}, c=64 ...", file=sys.stderr)
                figures.setdefault(name, {}).setdefault(64, []).append(drive(server.url, 64, duration))
        for name, server in servers.items():
            print(f"{name}, c=1 ...", file=sys.stderr)
            figures[name][1] = [drive(server.url, 1, duration)]
    return figures


def median_summary(summaries: list[dict]) -> dict:
    """The summary whose throughput is the median of the rounds'."""
    ordered = sorted(summaries, key=lambda summary: summary["throughput"])
    return ordered[len(ordered) // 2]


def section(figures: dict, command: str, duration: float, rounds: int, load: LoadAverage) -> tuple[str, dict]:
    medians = {name: {c: median_summary(runs) for c, runs in points.items()} for name, points in figures.items()}
    base = medians["process, 2 workers"][64]["throughput"]
    ratios = {name: points[64]["throughput"] / base for name, points in medians.items()}
    rows = []
    for name, points in medians.items():
        for concurrency in CONCURRENCIES:
            summary = points[concurrency]
            every = " / ".join(f"{run['throughput']:.0f}" for run in figures[name][concurrency])
            rows.append([name, f"c={concurrency}", summary["throughput"], every, latency(summary, "p50"),
                         latency(summary, "p95"), latency(summary, "p99"), errors(summary),
                         f"{ratios[name]:.0%}" if concurrency == 64 else None])
    header = ["system", "load", "req/s (median)", "req/s, each round", "p50 ms", "p95 ms", "p99 ms", "errors",
              "vs process c=64"]
    table = markdown_table(header, rows)
    redis_ratios = {name: ratio for name, ratio in ratios.items() if name.startswith("redis")}
    lines = "\n".join(
        f"- {name}: **{ratio:.0%}** of the process backend at c=64 (target ≥ {TARGET:.0%}): "
        f"{'met' if ratio >= TARGET else '**missed**'}"
        for name, ratio in redis_ratios.items()
    )
    text = f"""
## Redis mode vs process backend — {now_utc()}

- command: `{command}`
- machine: {machine()}; {load.line()}
- everything on this machine: the three setups run side by side (one redis-server, prefixes
  `one` and `two`), and the c=64 points alternate between them over {rounds} rounds (median shown),
  so background load hits all of them alike; every model process has cores // {WORKERS} torch
  threads; `batchserve bench` drives /v1/embeddings from a separate process on loopback, one
  sentence per request, {duration:g} s per point after a 2 s warm-up

{table}

{lines}
"""
    return text, {name: round(ratio, 3) for name, ratio in redis_ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured point")
    parser.add_argument("--rounds", type=int, default=3, help="c=64 measurements per system, interleaved")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    load = LoadAverage()
    figures = measure(args.duration, args.rounds)
    command = f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_redis.py --duration {args.duration:g} --rounds {args.rounds}"
    text, ratios = section(figures, command, args.duration, args.rounds, load)
    publish(text, write=not args.no_write)
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
