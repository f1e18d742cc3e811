"""Redis mode vs the process backend at equal worker count, on /v1/embeddings, in one run.

1. process: `serve --backend process --workers 2` (two supervised model processes);
2. redis, one worker host: `serve --backend redis` + `batchserve worker --workers 2`;
3. redis, two worker hosts: `serve --backend redis` + two `batchserve worker --threads-per-worker 1`.

All on this machine (loopback, one redis-server started here); every model process gets
cores // 2 torch threads.  Load comes from `batchserve bench` in a separate process, one
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

from harness import ENV, ROOT, Server, append_results, drive, errors, free_port, latency, machine, markdown_table, now_utc

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


def wait_for_workers(url: str, count: int, timeout: float = 180.0) -> None:
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(client.scan_iter(match="batchserve::all-MiniLM-L6-v2:workers:*"))) >= count:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{count} redis workers not up after {timeout:g} s")


def measure_points(url: str, duration: float) -> dict[int, dict]:
    return {concurrency: drive(url, concurrency, duration) for concurrency in CONCURRENCIES}


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchserve.cli", "serve", "--app", "embeddings", "--max-batch-size", "64", *args]


def measure(duration: float) -> dict[str, dict[int, dict]]:
    figures = {}
    print("process backend ...", file=sys.stderr)
    with Server("process", serve_command("--backend", "process", "--workers", str(WORKERS))) as server:
        figures["process, 2 workers"] = measure_points(server.url, duration)
    layouts = {
        "redis, 1 worker host × 2 processes": [("--workers", str(WORKERS))],
        "redis, 2 worker hosts × 1 process": [("--threads-per-worker", "1")] * WORKERS,
    }
    for name, worker_args in layouts.items():
        print(f"{name} ...", file=sys.stderr)
        with redis_server() as url, ExitStack() as stack:
            for args in worker_args:
                stack.enter_context(worker(url, *args))
            wait_for_workers(url, len(worker_args))
            with Server("redis-front", serve_command("--backend", "redis", "--redis-url", url)) as server:
                figures[name] = measure_points(server.url, duration)
    return figures


def section(figures: dict, command: str, duration: float) -> tuple[str, dict]:
    base = figures["process, 2 workers"][64]["throughput"]
    ratios = {name: points[64]["throughput"] / base for name, points in figures.items()}
    rows = []
    for name, points in figures.items():
        for concurrency, summary in points.items():
            rows.append([name, f"c={concurrency}", summary["throughput"], latency(summary, "p50"),
                         latency(summary, "p95"), latency(summary, "p99"), errors(summary),
                         f"{ratios[name]:.0%}" if concurrency == 64 else None])
    table = markdown_table(["system", "load", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "vs process c=64"], rows)
    redis_ratios = {name: ratio for name, ratio in ratios.items() if name.startswith("redis")}
    verdict = {name: ratio >= TARGET for name, ratio in redis_ratios.items()}
    lines = "\n".join(
        f"- {name}: **{ratio:.0%}** of the process backend at c=64 (target ≥ {TARGET:.0%}): "
        f"{'met' if verdict[name] else '**missed**'}"
        for name, ratio in redis_ratios.items()
    )
    text = f"""
## Redis mode vs process backend — {now_utc()}

- command: `{command}`
- machine: {machine()}
- everything on this machine: front, redis-server, workers and load share the CPUs; every model
  process has cores // {WORKERS} torch threads; `batchserve bench` drives /v1/embeddings from a separate
  process on loopback, one sentence per request, {duration:g} s per point after a 2 s warm-up

{table}

{lines}
"""
    return text, {name: round(ratio, 3) for name, ratio in redis_ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured point")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    figures = measure(args.duration)
    command = f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_redis.py --duration {args.duration:g}"
    text, ratios = section(figures, command, args.duration)
    print(text)
    print(json.dumps(ratios))
    if not args.no_write:
        append_results(text)


if __name__ == "__main__":
    main()
