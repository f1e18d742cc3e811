"""Soak: mixed traffic on every app for up to 10 minutes (`make soak`).

Checks that the front's and the workers' RSS at the end are within 10 % of their value
after warm-up (both read with nothing in flight; sampled every 30 s under load, for the
record), and that no request hung (each has a deadline; a client timeout past it counts
as hung). Appends a summary row to benchmarks/RESULTS.md; exits 1 on a failure.

    python benchmarks/soak.py [--seconds 480] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import sys
import time

import httpx
import orjson
from harness import Server, machine, markdown_table, now_utc, publish

from batchserve.bench.bodies import TEMPLATES, sentences
from batchserve.procinfo import descendants

DEADLINE = 30.0
SAMPLE_EVERY = 30.0  # seconds between RSS samples under load
QUIET = 2.0  # seconds the server idles (engines idle, nothing in flight) before an RSS reading
ENDPOINTS = {  # path in the server's OpenAPI spec → body template
    "/v1/embeddings": "embeddings",
    "/cluster": "cluster",
    "/v1/completions": "completions",
    "/autocomplete": "autocomplete",
    "/infill": "infill",
}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory(server_pid: int) -> tuple[int, int]:
    """(front RSS, sum of the workers' RSS) in bytes."""
    return rss_bytes(server_pid), sum(rss_bytes(pid) for pid in descendants(server_pid))


def traffic(paths: list[str]) -> itertools.cycle:
    texts = sentences(64, seed=7)
    bodies = []
    for path in paths:
        if path.startswith("/models/"):
            bodies += [(path, orjson.dumps({"inputs": texts[i : i + 2]})) for i in range(8)]
        else:
            build = TEMPLATES[ENDPOINTS[path]].build
            bodies += [(path, orjson.dumps(build(texts[i : i + 3]))) for i in range(8)]
    return itertools.cycle(bodies)


async def soak(url: str, pid: int, seconds: float, clients: int) -> dict:
    """Warm up, let the server go quiet and read its RSS; load it for the rest of ``seconds``
    (RSS sampled every 30 s); let it go quiet again and read its RSS at the end.

    Both readings are taken with nothing in flight, so they compare what the server keeps
    (a leak shows), not which requests happened to be running at that moment.
    """
    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE + 5) as client:
        spec = (await client.get("/openapi.json")).json()["paths"]
        paths = [path for path in ENDPOINTS if path in spec] + ["/models/echo/predict"]
        requests = traffic(paths)
        statuses: collections.Counter = collections.Counter()
        started = time.monotonic()
        trace: list[tuple[float, int, int]] = []  # under load: (seconds since start, front RSS, workers RSS)

        async def caller(until: float) -> None:
            while time.monotonic() < until:
                path, body = next(requests)
                try:
                    reply = await client.post(
                        path, content=body,
                        headers={"content-type": "application/json", "X-Request-Timeout": str(DEADLINE)},
                    )
                    statuses[str(reply.status_code)] += 1
                except httpx.TimeoutException:
                    statuses["hung"] += 1
                except httpx.HTTPError as error:
                    statuses[type(error).__name__] += 1

        async def sample_memory(until: float) -> None:
            while time.monotonic() < until:
                trace.append((time.monotonic() - started, *memory(pid)))
                await asyncio.sleep(min(SAMPLE_EVERY, max(0.0, until - time.monotonic())))

        async def load_then_quiet(until: float) -> tuple[int, int]:
            await asyncio.gather(sample_memory(until), *(caller(until) for _ in range(clients)))
            await until_engines_idle(client)
            await asyncio.sleep(QUIET)
            return memory(pid)

        after_warm_up = await load_then_quiet(started + min(60.0, seconds * 0.2))
        at_end = await load_then_quiet(started + seconds)
    return {"paths": paths, "statuses": dict(statuses), "warm": after_warm_up, "end": at_end, "trace": trace}


async def until_engines_idle(client: httpx.AsyncClient, within: float = 60.0) -> None:
    """Wait until no generation engine has work left (an answered 504 may leave some)."""
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        services = (await client.get("/readyz")).json()["services"].values()
        engines = [service["engine"] for service in services if "engine" in service]
        if all(engine.get("idle", True) for engine in engines):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the generation engine was still busy {within:g} s after the load stopped")


def growth(before: int, after: int) -> float:
    return (after - before) / before if before else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=480.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    command = [sys.executable, "-m", "batchserve.cli", "serve", "--app", "all", "--model", "echo=tests.fakes:echo",
               "--backend", "process", "--workers", "2", "--drain-seconds", "0"]
    with Server("soak", command) as server:
        figures = asyncio.run(soak(server.url, server.process.pid, args.seconds, args.clients))
    (front_warm, workers_warm), (front_end, workers_end) = figures["warm"], figures["end"]
    front_growth, workers_growth = growth(front_warm, front_end), growth(workers_warm, workers_end)
    answered = sum(count for status, count in figures["statuses"].items() if status.isdigit())
    hung = figures["statuses"].get("hung", 0)
    # a clear error before the deadline (503 overload, 504 deadline) is an answer; anything else fails
    failed = [s for s in figures["statuses"] if s not in ("200", "503", "504")]
    ok = hung == 0 and not failed and abs(front_growth) <= 0.10 and abs(workers_growth) <= 0.10
    row = [
        now_utc(), f"{args.seconds:.0f} s, {args.clients} clients", ", ".join(figures["paths"]), answered, hung,
        ", ".join(f"{k}: {v}" for k, v in sorted(figures["statuses"].items())),
        f"{front_warm / 2**20:.0f} → {front_end / 2**20:.0f} MiB ({front_growth:+.1%})",
        f"{workers_warm / 2**20:.0f} → {workers_end / 2**20:.0f} MiB ({workers_growth:+.1%})",
        "pass" if ok else "FAIL",
    ]
    table = markdown_table(
        ["date", "run", "endpoints", "answered", "hung", "statuses", "front RSS", "workers RSS", "verdict"], [row]
    )
    trace = ", ".join(f"{t:.0f} s: {front / 2**20:.0f}/{workers / 2**20:.0f}" for t, front, workers in figures["trace"])
    section = (
        f"## Soak (`make soak`)\n\nMachine: {machine()}. Command: `python benchmarks/soak.py --seconds {args.seconds:g}"
        f" --clients {args.clients}`\n\n{table}\nRSS readings: after warm-up and at the end, each after {QUIET:g} s"
        f" with nothing in flight; under load, every {SAMPLE_EVERY:g} s (front/workers MiB): {trace}\n"
    )
    publish(section, write=not args.no_write)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
