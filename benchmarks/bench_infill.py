"""Infill under concurrency: 16 clients against one, on the tutorial's sentences (issue 12).

One `batchserve serve --app infill` process on loopback (its defaults: the llama.cpp runtime
on a CPU when llama-cpp-python loads), driven from this process with httpx over
``POST /infill``:

1. the tutorial's answers: "twinkle twinkle [MASK] star." → "little", "the answer to life,
   the [MASK], and everything." → "universe", "Happy birthday to [MASK]." → "you";
2. closed loops of ``--duration`` seconds each, one client and then ``--clients`` clients
   sending back to back, each client going through the tutorial's three sentences in turn
   (client ``i`` starting at sentence ``i mod 3``): req/s, p50 and p99 latency — target:
   16 clients >= 4x the req/s of one;
3. the same two loops on distinct sentences (the load generator's infill bodies: no two
   requests alike), where nothing but the passes can be shared.

Every request carries the default seed (0), as the tutorial's do.  The section goes to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httpx
import numpy as np
import orjson
from harness import LoadAverage, Server, machine, markdown_table, now_utc, publish

from batchserve.bench.bodies import request_bodies

TUTORIAL = {
    "twinkle twinkle [MASK] star.": "little",
    "the answer to life, the [MASK], and everything.": "universe",
    "Happy birthday to [MASK].": "you",
}
SPEEDUP_TARGET = 4.0
HOW = (
    "shared between concurrent requests while in flight, nothing kept between requests: candidate texts scored in "
    "one engine job for every request waiting (each distinct text once), proposals made once for requests with the "
    "same text before the mask and the same seed; distinct sentences share only the passes"
)


async def answers(client: httpx.AsyncClient) -> dict[str, str]:
    filled = {}
    for text in TUTORIAL:
        response = await client.post("/infill", json={"text": text})
        response.raise_for_status()
        filled[text] = response.json()["fills"][0]["fill"]
    return filled


async def closed_loop(url: str, bodies: list[bytes], clients: int, duration: float, timeout: float) -> dict:
    """``clients`` clients sending back to back for ``duration`` s, client i from body i."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    stop = time.perf_counter() + duration

    async def client_loop(index: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
            turn = index
            while time.perf_counter() < stop:
                body = bodies[turn % len(bodies)]
                turn += 1
                started = time.perf_counter()
                try:
                    response = await client.post("/infill", content=body, headers={"content-type": "application/json"})
                    status = str(response.status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                if status == "200":
                    latencies.append(time.perf_counter() - started)
                else:
                    failures[status] = failures.get(status, 0) + 1

    began = time.perf_counter()
    await asyncio.gather(*(client_loop(index) for index in range(clients)))
    elapsed = time.perf_counter() - began
    values = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "answered": len(latencies),
        "req_s": len(latencies) / elapsed,
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of each closed loop")
    parser.add_argument("--threads", type=int, default=2, help="--generation-threads of the server")
    parser.add_argument("--runtime", choices=["auto", "llama.cpp", "torch"], default="auto")
    parser.add_argument("--skip-distinct", action="store_true", help="only the tutorial's sentences")
    parser.add_argument("--no-results", action="store_true", help="print the section, do not append it to RESULTS.md")
    args = parser.parse_args()

    load_average = LoadAverage()
    timeout = 120.0
    command = [
        sys.executable, "-m", "batchserve.cli", "serve", "--app", "infill", "--generation-runtime", args.runtime,
        "--generation-threads", str(args.threads), "--timeout", str(timeout),
    ]
    tutorial = [orjson.dumps({"text": text}) for text in TUTORIAL]
    sets = {"the tutorial's 3 sentences": tutorial}
    if not args.skip_distinct:
        sets["distinct sentences"] = request_bodies("infill")
    with Server("infill", command, ready_timeout=600) as server:
        facts = httpx.get(server.url + "/readyz", timeout=10).json()
        engine = next(iter(facts.get("services", {}).values()), {}).get("engine", facts)
        filled = asyncio.run(answers(httpx.AsyncClient(base_url=server.url, timeout=timeout)))
        figures = {}
        for name, bodies in sets.items():
            for clients in (1, args.clients):
                print(f"{name}, {clients} client(s) ...", file=sys.stderr)
                figures[name, clients] = asyncio.run(closed_loop(server.url, bodies, clients, args.duration, timeout))

    rows = []
    for text, expected in TUTORIAL.items():
        rows.append([f"`{text}`", f"{filled[text]!r}", "", f"{expected!r}: {'met' if filled[text] == expected else 'NOT met'}"])
    for name in sets:
        one, many = figures[name, 1], figures[name, args.clients]
        speedup = many["req_s"] / one["req_s"] if one["req_s"] else float("nan")
        for clients, result in ((1, one), (args.clients, many)):
            errors = ", ".join(f"{count} x {status}" for status, count in result["failures"].items()) or "none"
            target = ""
            if clients != 1:
                target = "(no target)"
                if name in sets and sets[name] is tutorial:
                    target = f"≥ {SPEEDUP_TARGET:g}×: {'met' if speedup >= SPEEDUP_TARGET else 'NOT met'}"
            rows.append([
                f"{name}, {clients} client{'s' if clients > 1 else ''}",
                f"{result['req_s']:.2f} req/s (p50 {result['p50']:.2f} s, p99 {result['p99']:.2f} s; "
                f"{result['answered']} answered, errors: {errors})",
                "1.00×" if clients == 1 else f"{speedup:.2f}×",
                target,
            ])
    section = "\n".join([
        f"## Infill: {args.clients} clients against one, /infill — {now_utc()}",
        "",
        f"- command: `{' '.join(['python benchmarks/bench_infill.py', *sys.argv[1:]])}` (`make bench-infill`)",
        f"- machine: {machine()}; {load_average.line()}",
        f"- server: `batchserve serve --app infill --generation-runtime {args.runtime} --generation-threads "
        f"{args.threads}` (SmolLM2-135M-Instruct on the {engine.get('runtime')} runtime, {engine.get('precision')}); "
        f"closed loops of {args.duration:g} s, seed 0 (the default)",
        f"- {HOW}",
        "",
        markdown_table(["what", "figure", "ratio", "target"], rows),
    ])
    publish(section, write=not args.no_results)


if __name__ == "__main__":
    main()
