"""batchserve's generation app against llama.cpp's own llama-server, side by side in one run.

Both servers run in turn on loopback with the same GGUF (the bundled SmolLM2-135M-Instruct
Q4_1) and are driven from this process with httpx over ``POST /v1/completions``:

* batchserve: ``batchserve serve --app generation --generation-threads 2`` (its defaults
  otherwise: the llama.cpp runtime on a CPU, the prefix cache on);
* llama-server: ``--parallel 8 -t 2 -c 8192 --no-webui`` (its defaults otherwise: the
  prompt cache on).

Measured for each (issue 12's targets, batchserve against llama-server):

1. one request, 32 tokens: tok/s = 32 over the median n=1 latency (wall clock, prefill and
   HTTP included) — target: batchserve >= 0.9x llama-server;
2. n=3 latency over n=1 latency, 32 tokens, same prompt, alternating — target <= 1.3
   (1 and 2 with both servers up, taking turns request by request: the machine's speed
   drifts by 10 % within minutes, and a drift then reaches both alike);
3. 8 editor clients, each sending n=3 x 12 tokens back to back for ``--duration`` seconds,
   every prompt distinct: req/s and p50/p99 latency — target: batchserve >= 2x llama-server's
   req/s with its p99 <= 2x its p50;
4. the editor's pattern: an 834-character document, then the same plus three typed words
   (n=3, 12 tokens): the second request's latency over the first's — target <= 0.4.

Every request asks for ``ignore_eos`` so each one generates exactly ``max_tokens`` tokens.
llama-server is ``--llama-server`` (``make bench-llama-server`` builds it from the llama.cpp
sources llama-cpp-python vendors when ``LLAMA_SERVER`` is not given).  If it answers n>1 with
fewer choices, n requests with different seeds are sent at once instead (that is how its user
gets n alternatives), and the section says so.  The section goes to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from bench_generation import DOCUMENT, PROMPT, TYPED
from harness import LoadAverage, Server, machine, markdown_table, now_utc, publish

ONE_TOKENS_TARGET = 0.9  # batchserve tok/s over llama-server's, one request
N_RATIO_TARGET = 1.3  # n=3 latency over n=1 latency
CLIENTS_TARGET = 2.0  # batchserve req/s over llama-server's, 8 editor clients
TAIL_TARGET = 2.0  # p99 over p50, 8 editor clients
EDITOR_RATIO_TARGET = 0.4  # next Tab over first Tab
PARTS = ("one", "clients", "editor")
SENTENCES = [sentence.strip() + "." for sentence in DOCUMENT.split(". ") if sentence.strip()]


@dataclass
class Peer:
    """A server under test: its name, command line and the path that says it is ready."""

    name: str
    command: list[str]
    ready_path: str
    native_n: bool = True  # answers n choices itself (else: n requests at once)
    facts: dict = field(default_factory=dict)


async def complete(client: httpx.AsyncClient, peer: Peer, prompt: str, n: int, max_tokens: int, seed: int) -> float:
    """One completion of ``n`` choices (``n`` requests with seeds seed..seed+n-1 if the peer
    lacks ``n``); its wall-clock latency."""
    def body(n: int, seed: int) -> dict:
        return {"prompt": prompt, "n": n, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "ignore_eos": True}

    async def post(payload: dict) -> int:
        response = await client.post("/v1/completions", json=payload)
        response.raise_for_status()
        return len(response.json()["choices"])

    started = time.perf_counter()
    if peer.native_n or n == 1:
        choices = await post(body(n, seed))
    else:
        choices = sum(await asyncio.gather(*(post(body(1, seed + i)) for i in range(n))))
    if choices != n:
        raise RuntimeError(f"{peer.name} answered {choices} choices for n={n}")
    return time.perf_counter() - started


async def probe_n(url: str) -> bool:
    """Whether a server answers ``n=3`` with three choices."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        body = {"prompt": "Hello", "n": 3, "max_tokens": 2, "temperature": 1.0, "seed": 1, "ignore_eos": True}
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        return len(response.json()["choices"]) == 3


async def one_and_n(urls: dict[str, str], peers: dict[str, Peer], repeats: int, max_tokens: int) -> dict[str, dict]:
    """Per server, the median latency of n=1 and of n=3 on the same prompt, after a warm-up.

    Both servers are up (an idle one sleeps) and take turns request by request, so a drift of
    the machine's speed during the run (seen: 10 % within minutes) reaches both alike."""
    latencies = {name: {1: [], 3: []} for name in urls}
    clients = {name: httpx.AsyncClient(base_url=url, timeout=600) for name, url in urls.items()}
    try:
        for name, client in clients.items():
            await complete(client, peers[name], PROMPT, 1, 4, 0)
        for repeat in range(repeats):
            for n in (1, 3):
                for name, client in clients.items():
                    latencies[name][n].append(await complete(client, peers[name], PROMPT, n, max_tokens, repeat * 10))
    finally:
        for client in clients.values():
            await client.aclose()
    results = {}
    for name, figures in latencies.items():
        one, three = statistics.median(figures[1]), statistics.median(figures[3])
        results[name] = {"n1_s": one, "n3_s": three, "tok_s": max_tokens / one, "n_ratio": three / one,
                         "n1_all": figures[1], "n3_all": figures[3]}
    return results


def client_prompt(client: int, request: int) -> str:
    """A prompt no other request of the run begins with: an editor's short context."""
    sentence = SENTENCES[(client + request) % len(SENTENCES)]
    return f"Note {client + 1}.{request + 1}: {sentence}"


async def editor_clients(url: str, peer: Peer, clients: int, duration: float, n: int, max_tokens: int) -> dict:
    """``clients`` loops, each sending its requests back to back until ``duration`` is over."""
    latencies: list[float] = []

    async def loop(client: httpx.AsyncClient, index: int, deadline: float) -> None:
        request = 0
        while time.perf_counter() < deadline:
            latencies.append(await complete(client, peer, client_prompt(index, request), n, max_tokens, index * 1000 + request))
            request += 1

    limits = httpx.Limits(max_connections=clients * n)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await complete(client, peer, "Warm-up.", n, 4, 0)
        started = time.perf_counter()
        await asyncio.gather(*(loop(client, index, started + duration) for index in range(clients)))
        seconds = time.perf_counter() - started
    p50, p99 = (float(np.percentile(latencies, q)) for q in (50, 99))
    return {"requests": len(latencies), "seconds": seconds, "req_s": len(latencies) / seconds,
            "p50_s": p50, "p99_s": p99, "tail": p99 / p50, "max_s": max(latencies)}


async def editor_tabs(url: str, peer: Peer, documents: int) -> dict:
    """First Tab: a document (new to the server); next Tab: the same plus three typed words."""
    firsts, seconds = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await complete(client, peer, "Warm-up.", 3, 4, 0)
        for index in range(documents):
            document = f"Draft {index + 1}. {DOCUMENT}"
            firsts.append(await complete(client, peer, document, 3, 12, index))
            seconds.append(await complete(client, peer, document + TYPED, 3, 12, index))
    ratios = [second / first for first, second in zip(firsts, seconds)]
    return {"first_s": statistics.median(firsts), "second_s": statistics.median(seconds), "ratio": statistics.median(ratios)}


async def engine_facts(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return (await client.get("/readyz")).json()["services"]["generation"]["engine"]


def start(peer: Peer, stack: contextlib.ExitStack) -> Server:
    print(f"{peer.name}: starting ...", file=sys.stderr)
    server = stack.enter_context(Server(peer.name, peer.command, ready_path=peer.ready_path, ready_timeout=600))
    if peer.name == "batchserve":
        peer.facts = asyncio.run(engine_facts(server.url))
    peer.native_n = asyncio.run(probe_n(server.url))
    return server


def measure_one(peers: list[Peer], args: argparse.Namespace) -> dict[str, dict]:
    """The one-request part, both servers up at once, taking turns."""
    before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        urls = {peer.name: start(peer, stack).url for peer in peers}
        print("one request, n=1 vs n=3, the servers taking turns ...", file=sys.stderr)
        results = asyncio.run(one_and_n(urls, {peer.name: peer for peer in peers}, args.repeats, args.max_tokens))
    for figures in results.values():
        figures["load_before"], figures["load_after"] = before, os.getloadavg()[0]
    return results


def measure(peer: Peer, args: argparse.Namespace) -> dict:
    """Start the peer, run the chosen parts but the first against it, stop it; the figures and the load."""
    results: dict = {"load_before": os.getloadavg()[0]}
    with contextlib.ExitStack() as stack:
        server = start(peer, stack)
        if "editor" in args.parts:
            print(f"{peer.name}: editor's next Tab ...", file=sys.stderr)
            results["editor"] = asyncio.run(editor_tabs(server.url, peer, args.documents))
        if "clients" in args.parts:
            print(f"{peer.name}: {args.clients} editor clients, {args.duration:g} s ...", file=sys.stderr)
            results["clients"] = asyncio.run(editor_clients(server.url, peer, args.clients, args.duration, 3, 12))
    results["load_after"] = os.getloadavg()[0]
    print(f"{peer.name}: {results}", file=sys.stderr)
    return results


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def rows_for(ours: dict, theirs: dict, args: argparse.Namespace) -> list[list[str]]:
    rows: list[list[str]] = []
    if "one" in ours:
        a, b = ours["one"], theirs["one"]
        ratio = a["tok_s"] / b["tok_s"]
        rows += [
            [f"one request, {args.max_tokens} tokens: tok/s", f"{a['tok_s']:.1f}", f"{b['tok_s']:.1f}", f"{ratio:.2f}×",
             f"≥ {ONE_TOKENS_TARGET}× {verdict(ratio >= ONE_TOKENS_TARGET)}"],
            ["latency n=1", f"{a['n1_s']:.3f} s", f"{b['n1_s']:.3f} s", "", ""],
            ["latency n=3", f"{a['n3_s']:.3f} s", f"{b['n3_s']:.3f} s", "", ""],
            ["n=3 latency / n=1 latency", f"{a['n_ratio']:.2f}", f"{b['n_ratio']:.2f}", "",
             f"batchserve ≤ {N_RATIO_TARGET} {verdict(a['n_ratio'] <= N_RATIO_TARGET)}"],
        ]
    if "clients" in ours:
        a, b = ours["clients"], theirs["clients"]
        ratio = a["req_s"] / b["req_s"]
        met = ratio >= CLIENTS_TARGET and a["tail"] <= TAIL_TARGET
        rows += [
            [f"{args.clients} editor clients (n=3 × 12 tokens): req/s", f"{a['req_s']:.2f} ({a['requests']} in {a['seconds']:.1f} s)",
             f"{b['req_s']:.2f} ({b['requests']} in {b['seconds']:.1f} s)", f"{ratio:.2f}×",
             f"≥ {CLIENTS_TARGET}× and p99 ≤ {TAIL_TARGET}× p50: {verdict(met)}"],
            ["… latency p50 / p99 (max)", f"{a['p50_s']:.2f} / {a['p99_s']:.2f} ({a['max_s']:.2f}) s",
             f"{b['p50_s']:.2f} / {b['p99_s']:.2f} ({b['max_s']:.2f}) s", "", ""],
            ["… p99 / p50", f"{a['tail']:.2f}", f"{b['tail']:.2f}", "",
             f"batchserve ≤ {TAIL_TARGET} {verdict(a['tail'] <= TAIL_TARGET)}"],
        ]
    if "editor" in ours:
        a, b = ours["editor"], theirs["editor"]
        rows += [
            ["editor: first Tab (834-character document, n=3 × 12)", f"{a['first_s']:.3f} s", f"{b['first_s']:.3f} s", "", ""],
            ["editor: next Tab (+ three typed words)", f"{a['second_s']:.3f} s", f"{b['second_s']:.3f} s", "", ""],
            ["editor: next Tab / first Tab", f"{a['ratio']:.2f}", f"{b['ratio']:.2f}", "",
             f"batchserve ≤ {EDITOR_RATIO_TARGET} {verdict(a['ratio'] <= EDITOR_RATIO_TARGET)}"],
        ]
    rows.append(["load average (1 min) at start / end", f"{ours['load_before']:.1f} / {ours['load_after']:.1f}",
                 f"{theirs['load_before']:.1f} / {theirs['load_after']:.1f}", "", ""])
    return rows


def llama_server_version(binary: str) -> str:
    finished = subprocess.run([binary, "--version"], check=False, capture_output=True, text=True, timeout=60)
    lines = (finished.stdout + finished.stderr).strip().splitlines()
    version = next((line for line in lines if line.startswith("version:")), "version: unknown")
    return version.removeprefix("version:").strip()


def llama_cpp_python_version() -> str:
    try:
        import llama_cpp
    except ImportError:
        return "not installed"
    return llama_cpp.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="the llama-server binary (env LLAMA_SERVER)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens of the one-request and n=3 vs n=1 parts")
    parser.add_argument("--repeats", type=int, default=7, help="n=1 / n=3 latency pairs")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds the editor clients send for")
    parser.add_argument("--documents", type=int, default=3, help="documents of the editor's next-Tab part")
    parser.add_argument("--threads", type=int, default=2, help="threads of both servers (-t, --generation-threads)")
    parser.add_argument("--note", default="", help="a line added to the section (e.g. why a point was rerun)")
    parser.add_argument("--no-results", action="store_true", help="print the section, do not append it to RESULTS.md")
    args = parser.parse_args()
    if not args.llama_server or not Path(args.llama_server).is_file():
        parser.error(f"no llama-server binary at {args.llama_server!r}: give --llama-server or LLAMA_SERVER "
                     "(make bench-llama-server builds one)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from batchserve.runtimes.bundled import bundled_gguf_path

    gguf = bundled_gguf_path()
    load_average = LoadAverage()
    ours = Peer("batchserve", [sys.executable, "-m", "batchserve.cli", "serve", "--app", "generation",
                               "--generation-threads", str(args.threads), "--timeout", "600"], "/readyz")
    theirs = Peer("llama-server", [str(Path(args.llama_server).resolve()), "-m", str(gguf), "--parallel", "8",
                                   "-t", str(args.threads), "-c", "8192", "--no-webui", "--host", "127.0.0.1"], "/health")
    ours_results, theirs_results = {}, {}
    if "one" in args.parts:
        one = measure_one([ours, theirs], args)
        ours_results["one"], theirs_results["one"] = one[ours.name], one[theirs.name]
        for results, name in ((ours_results, ours.name), (theirs_results, theirs.name)):
            results["load_before"], results["load_after"] = one[name]["load_before"], one[name]["load_after"]
    if set(args.parts) - {"one"}:
        ours_results.update(measure(ours, args))
        theirs_results.update(measure(theirs, args))

    command_line = shlex.join(["python", "benchmarks/bench_llama_server.py", *sys.argv[1:]])
    n_note = "" if theirs.native_n else (
        " llama-server answered n=3 with fewer choices, so 3 requests with different seeds were sent at once for each n=3.")
    facts = ours.facts
    section = "\n".join([
        f"## Generation: batchserve against llama-server, /v1/completions — {now_utc()}",
        "",
        f"- command: `{command_line}` (`make bench-llama-server`)",
        f"- machine: {machine()}; {load_average.line()} (shared with other jobs while measured)",
        (f"- versions: llama-server {llama_server_version(args.llama_server)} (built from the llama.cpp that "
        f"llama-cpp-python vendors), llama-cpp-python {llama_cpp_python_version()}"),
        (f"- same GGUF: {gguf.name}; batchserve: `serve --app generation --generation-threads {args.threads}` "
        f"(runtime {facts.get('runtime')}, {facts.get('precision')}); llama-server: "
        f"`--parallel 8 -t {args.threads} -c 8192 --no-webui`; both with their defaults otherwise (prompt/prefix caches on)"),
        (f"- every request temperature 1, ignore_eos; one request and n=3 vs n=1: median of {args.repeats} alternating "
        f"pairs on a {len(PROMPT.split())}-word prompt, both servers up and taking turns request by request; "
        f"editor clients: {args.clients} clients back to back for "
        f"{args.duration:g} s, each prompt distinct (\"Note C.R: <a sentence>\"); next Tab: medians over "
        f"{args.documents} documents; latencies are wall clock at the client.{n_note}"),
        *([f"- note: {args.note}"] if args.note else []),
        "",
        markdown_table(["what", "batchserve", "llama-server", "batchserve / llama-server", "target"],
                       rows_for(ours_results, theirs_results, args)),
    ])
    publish(section, write=not args.no_results)


if __name__ == "__main__":
    main()
