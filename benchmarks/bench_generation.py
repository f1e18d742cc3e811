"""Generation benchmark: n alternatives and continuous batching, side by side in one run.

1. model load: dequantizing the bundled GGUF into a fresh safetensors cache, then loading
   from that cache (in-process);
2. latency of ``n=3`` vs ``n=1`` on the same prompt, ``max_tokens`` 32 (requests alternate;
   medians);
3. generated tokens/s with 8 concurrent clients vs one client at a time (each client sends
   its requests back to back);
4. the editor's pattern: an 834-character document, then the same plus three typed words
   (``n=3``, 12 tokens, as the editor asks): the second request's latency over the first's
   (the prefix cache of the llama.cpp runtime reuses the document; medians over documents).

``--runtime`` picks the server's ``--generation-runtime`` (default auto: llama.cpp on a CPU
when llama-cpp-python loads); one request's tok/s is ``max_tokens`` over the n=1 latency.

Both HTTP parts run against one `batchserve serve --app generation` process on loopback,
driven from this process with httpx.  Every request asks for ``ignore_eos`` so each one
generates exactly ``max_tokens`` tokens.  Targets (issue 5): n=3 latency <= 1.3x n=1;
8 clients >= 4x one-at-a-time.  The figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time

import httpx
from harness import LoadAverage, Server, machine, markdown_table, now_utc, publish

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
DOCUMENT = (  # 834 characters, as in issue 12
    "The lighthouse stood at the edge of the northern cliffs, where the sea was grey for most of the year. "
    "Its keeper, an old man named Tobias, had lived there alone for thirty years. Every evening he climbed "
    "the hundred and twelve steps to the lamp room, trimmed the wick, polished the great lens and watched "
    "the ships pass far out on the horizon. He kept a logbook of every vessel he saw: its name if he could "
    "read it, the direction it sailed, the weather and the state of the sea. One autumn morning, after a "
    "night of storms, he walked down to the small beach below the cliffs to gather driftwood for his stove. "
    "Among the seaweed and broken shells he found a green glass bottle, sealed with wax, and inside it a "
    "rolled sheet of paper tied with a faded red ribbon. He carried it home and set it on the kitchen table to dry near the fire."
)
TYPED = " Then he opened"
EDITOR_RATIO_TARGET = 0.4
N_RATIO_TARGET = 1.3
THROUGHPUT_TARGET = 4.0


def measure_load() -> dict:
    from batchserve.generation import load_causal_lm

    with tempfile.TemporaryDirectory(prefix="bench-gen-cache-") as cache:
        first = load_causal_lm(cache_dir=cache)
        del first.model
        cached = load_causal_lm(cache_dir=cache)
    return {"dequantize_s": first.converted_seconds, "first_load_s": first.load_seconds, "cached_load_s": cached.load_seconds}


async def completion(client: httpx.AsyncClient, n: int, max_tokens: int, seed: int) -> tuple[float, int]:
    body = {"prompt": PROMPT, "n": n, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "ignore_eos": True}
    started = time.perf_counter()
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()
    return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]


async def n_latency(url: str, repeats: int, max_tokens: int) -> dict:
    latencies = {1: [], 3: []}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await completion(client, 1, 4, 0)  # warm-up
        for repeat in range(repeats):
            for n in (1, 3):
                seconds, _ = await completion(client, n, max_tokens, repeat)
                latencies[n].append(seconds)
    return {n: statistics.median(values) for n, values in latencies.items()}


async def editor_pattern(url: str, documents: int) -> dict:
    """First request: a document; second: the same plus three words (n=3, 12 tokens each)."""
    async def tab(client: httpx.AsyncClient, text: str, seed: int) -> float:
        body = {"prompt": text, "n": 3, "max_tokens": 12, "temperature": 1.0, "seed": seed, "ignore_eos": True}
        started = time.perf_counter()
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - started

    firsts, seconds = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await tab(client, "Warm-up.", 0)
        for index in range(documents):
            document = f"Draft {index + 1}. {DOCUMENT}"  # a document no earlier request began with
            firsts.append(await tab(client, document, index))
            seconds.append(await tab(client, document + TYPED, index))
    ratios = [second / first for first, second in zip(firsts, seconds)]
    return {"first": statistics.median(firsts), "second": statistics.median(seconds), "ratio": statistics.median(ratios)}


async def engine_facts(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return (await client.get("/readyz")).json()["services"]["generation"]["engine"]


async def clients_throughput(url: str, clients: int, requests_each: int, max_tokens: int) -> dict:
    async def client_loop(client: httpx.AsyncClient, index: int) -> int:
        tokens = 0
        for repeat in range(requests_each):
            _, generated = await completion(client, 1, max_tokens, index * 1000 + repeat)
            tokens += generated
        return tokens

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(client_loop(client, index) for index in range(clients))))
        seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="n=1 / n=3 latency pairs")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-each", type=int, default=2, help="requests per client in the concurrent run")
    parser.add_argument("--threads", type=int, default=1, help="the runtime's threads in the server (--generation-threads)")
    parser.add_argument("--runtime", choices=["auto", "llama.cpp", "torch"], default="auto", help="--generation-runtime of the server")
    parser.add_argument("--documents", type=int, default=3, help="documents of the editor pattern (0: skip it)")
    parser.add_argument("--skip-load", action="store_true", help="do not measure the GGUF conversion (torch runtime only)")
    parser.add_argument("--no-results", action="store_true", help="print the section, do not append it to RESULTS.md")
    args = parser.parse_args()

    load_average = LoadAverage()
    load = None if args.skip_load or args.runtime != "torch" else measure_load()
    command = [
        sys.executable, "-m", "batchserve.cli", "serve", "--app", "generation", "--generation-runtime", args.runtime,
        "--generation-threads", str(args.threads), "--timeout", "600",
    ]
    with Server("generation", command, ready_timeout=600) as server:
        facts = asyncio.run(engine_facts(server.url))
        print("latency n=1 vs n=3 ...", file=sys.stderr)
        latency = asyncio.run(n_latency(server.url, args.repeats, args.max_tokens))
        sequential_requests = args.requests_each * 2
        print("one client at a time ...", file=sys.stderr)
        alone = asyncio.run(clients_throughput(server.url, 1, sequential_requests, args.max_tokens))
        print(f"{args.clients} concurrent clients ...", file=sys.stderr)
        together = asyncio.run(clients_throughput(server.url, args.clients, args.requests_each, args.max_tokens))
        editor = None
        if args.documents:
            print("editor pattern ...", file=sys.stderr)
            editor = asyncio.run(editor_pattern(server.url, args.documents))

    n_ratio = latency[3] / latency[1]
    speedup = together["tokens_per_s"] / alone["tokens_per_s"]
    rows = [
        ["one request (n=1), tok/s", f"{args.max_tokens / latency[1]:.1f} tok/s", "", ""],
        ["latency, n=1", f"{latency[1]:.2f} s", "1.00×", ""],
        ["latency, n=3", f"{latency[3]:.2f} s", f"{n_ratio:.2f}×",
         f"≤ {N_RATIO_TARGET}× {'met' if n_ratio <= N_RATIO_TARGET else 'NOT met'}"],
        [f"one client at a time ({sequential_requests} requests)", f"{alone['tokens_per_s']:.1f} tok/s", "1.00×", ""],
        [
            f"{args.clients} concurrent clients ({args.clients * args.requests_each} requests)",
            f"{together['tokens_per_s']:.1f} tok/s",
            f"{speedup:.2f}×",
            f"≥ {THROUGHPUT_TARGET}× {'met' if speedup >= THROUGHPUT_TARGET else 'NOT met'}",
        ],
    ]
    if editor:
        rows += [
            ["editor: 834-character document, n=3 × 12 tokens", f"{editor['first']:.2f} s", "1.00×", ""],
            [
                "editor: the same plus three typed words",
                f"{editor['second']:.2f} s",
                f"{editor['ratio']:.2f}×",
                f"≤ {EDITOR_RATIO_TARGET}× {'met' if editor['ratio'] <= EDITOR_RATIO_TARGET else 'NOT met'}",
            ],
        ]
    if load:
        rows += [
            ["dequantize GGUF → safetensors (once)", f"{load['dequantize_s']:.1f} s", "", ""],
            ["load from the safetensors cache", f"{load['cached_load_s']:.2f} s", "", ""],
        ]
    section = "\n".join([
        f"## Generation: n alternatives and continuous batching, /v1/completions — {now_utc()}",
        "",
        f"- command: `{' '.join(['python benchmarks/bench_generation.py', *sys.argv[1:]])}`",
        f"- machine: {machine()} (shared with other jobs while measured: compare rows of this table only); "
        f"{load_average.line()}",
        f"- server: `batchserve serve --app generation --generation-runtime {args.runtime} --generation-threads "
        f"{args.threads}` (SmolLM2-135M-Instruct on the {facts.get('runtime')} runtime, {facts.get('precision')}); "
        f"prompt of {len(PROMPT.split())} words, max_tokens {args.max_tokens}, temperature 1, "
        f"ignore_eos; latency: median of {args.repeats} alternating pairs; editor: medians over {args.documents} documents",
        "",
        markdown_table(["what", "figure", "ratio", "target"], rows),
    ])
    publish(section, write=not args.no_results)


if __name__ == "__main__":
    main()
