"""Offline batch jobs (issue 22): `batchserve run-batch` side by side in one run with the online
server, on the embeddings and on generation.

Embeddings (``--part embeddings``), against the online server at c=64 and the runtime's own
length-sorted ceiling in one process:

* **ceiling**: batchserve's ONNX runtime in this process with every core, the job's sentences
  sorted by token count over the whole file and run as the token-budgeted passes the batcher
  makes (rows x longest <= 256, at most 64 rows): no HTTP, no JSON, no batcher, no padding to speak of;
* **online**: `batchserve serve --app embeddings` (its default layout) driven by
  `batchserve bench --concurrency 64`, one sentence per request (the load generator's pool);
* **run-batch**: `batchserve run-batch` (its default layout: the model on a thread of the job) on a file of the same
  sentences, one per line, its rate from its own summary (models loaded before the clock starts);
  the job's front RSS is read when its progress passes a tenth of the lines and at its last progress line.

Sentences: the load generator's mix (batchserve.bench.bodies.sentences: a quarter long).

Generation (``--part generation``), against the online server at c=32: ``--prompts`` chat
completions on the bundled SmolLM2 (:func:`chat_bodies`: instructions over the load generator's
sentences, half with a system message), ``max_tokens`` fixed, temperature 0, so both sides
decode the same greedy answers;

* **online**: `batchserve serve --app generation` (its default runtime: llama.cpp on a CPU), the
  same requests sent by 32 clients from this process (httpx), each taking the next request as
  its last is answered, in the file's order; the clock runs from the first request to the last answer;
* **run-batch**: `batchserve run-batch --app generation` (the same app, runtime and settings) on
  a file of the same requests, its seconds from its own summary (models loaded before the clock starts).

Prompts/s, and completion tokens/s counted from each answer's ``usage``. ``--part all`` (the
default) runs both parts, rounds taking turns within each part.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from harness import ENV, ROOT, LoadAverage, Server, drive, machine, markdown_table, now_utc, publish

MAX_BATCH_TOKENS, MAX_ROWS = 256, 64
LINES = 10_000
PROMPTS, MAX_TOKENS, CLIENTS = 500, 48, 32


def job_file(path: Path, texts: list[str]) -> None:
    with open(path, "wb") as file:
        for index, text in enumerate(texts):
            file.write(orjson.dumps({"custom_id": f"s{index}", "method": "POST", "url": "/v1/embeddings", "body": {"input": text}}))
            file.write(b"\n")


class Ceiling:
    """The runtime alone on the job's sentences, sorted by length as a whole (loaded once)."""

    def __init__(self, texts: list[str]):
        from batchserve.apps.embeddings import bundled_model_path
        from batchserve.runtimes.onnx.encoder import OnnxEncoder

        self.texts = texts
        self.model = OnnxEncoder(bundled_model_path(), threads=os.cpu_count())
        self.model.load()
        self.model.encode(texts[:64])  # warm-up

    def measure(self) -> dict:
        from batchserve.batching import length_passes

        texts, model = self.texts, self.model
        started = time.perf_counter()
        counts = model.token_counts(texts)  # what the batcher measures too
        order = sorted(range(len(texts)), key=counts.__getitem__)
        for start in range(0, len(order), 1024):
            chunk = order[start : start + 1024]
            for group in length_passes([counts[i] for i in chunk], MAX_ROWS, MAX_BATCH_TOKENS):
                model.encode([texts[chunk[i]] for i in group])
        elapsed = time.perf_counter() - started
        return {"sentences_per_s": len(texts) / elapsed, "seconds": elapsed}


def online(server: Server, duration: float) -> dict:
    summary = drive(server.url, 64, duration)
    return {"sentences_per_s": summary["throughput"], "errors": sum(summary["errors"].values())}


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


PROGRESS = re.compile(rb"run-batch: (\d+)/\d+ lines")


def run_batch(source: Path, output: Path, lines: int, app: str = "embeddings") -> dict:
    """The job in its own process; its front's RSS read when its progress lines pass a tenth of
    the lines and at its last progress line (before it stops its models)."""
    for path in (output, output.with_name(output.name.removesuffix(".jsonl") + ".errors.jsonl")):
        path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "batchserve.cli", "run-batch", "-i", str(source), "-o", str(output),
               "--app", app, "--log-every", "1"]
    log = Path(tempfile.gettempdir()) / "batchserve-bench-run-batch.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=sink, stderr=subprocess.STDOUT)
    early = late = None
    seen = 0
    while process.poll() is None:
        time.sleep(0.25)
        done = [int(match) for match in PROGRESS.findall(log.read_bytes())]
        if not done or done[-1] == seen:
            continue
        seen = done[-1]
        rss = rss_kib(process.pid)
        if rss is not None:
            late = rss
            if early is None and seen >= lines // 10:
                early = rss
    text = log.read_text()
    if process.returncode != 0:
        raise RuntimeError(f"run-batch exited with {process.returncode}:\n{text[-2000:]}")
    match = re.search(r"run-batch: (\d+) lines in ([\d.]+) s \(([\d.]+) lines/s\): (\d+) answered", text)
    if not match or int(match.group(4)) != lines:
        raise RuntimeError(f"run-batch did not answer every line:\n{text[-2000:]}")
    return {"sentences_per_s": float(match.group(3)), "seconds": float(match.group(2)), "rss_early": early, "rss_late": late}


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def section(rounds: list[dict], lines: int, duration: float, command: str, load: str) -> str:
    def figure(name: str) -> float:
        return median([r[name]["sentences_per_s"] for r in rounds])

    def each(name: str) -> str:
        return " / ".join(f"{r[name]['sentences_per_s']:.0f}" for r in rounds)

    vs_online = median([r["run-batch"]["sentences_per_s"] / r["online"]["sentences_per_s"] for r in rounds])
    vs_ceiling = median([r["run-batch"]["sentences_per_s"] / r["ceiling"]["sentences_per_s"] for r in rounds])
    errors = sum(r["online"]["errors"] for r in rounds)
    early = [r["run-batch"]["rss_early"] for r in rounds if r["run-batch"]["rss_early"]]
    late = [r["run-batch"]["rss_late"] for r in rounds if r["run-batch"]["rss_late"]]
    rss = "—"
    if early and late:
        rss = f"front RSS {early[-1] / 1024:.0f} MiB past {lines // 10} lines, {late[-1] / 1024:.0f} MiB near the end"
    rows = [
        ["runtime alone, whole file length-sorted (ceiling)", f"{lines} sentences, in process", figure("ceiling"), each("ceiling"), "—"],
        ["online server, `batchserve bench -c 64`", f"{duration:g} s after a 2 s warm-up", figure("online"), each("online"),
         f"errors: {errors}"],
        ["`batchserve run-batch`", f"{lines} lines", figure("run-batch"), each("run-batch"), rss],
    ]
    met = lambda ok: "met" if ok else "not met"  # noqa: E731
    memory = ""
    if early and late:
        growth = median([b / a - 1 for a, b in zip(early, late)])
        memory = (f"\n- run-batch front RSS near the end vs past a tenth of the lines: **{100 * growth:+.1f} %** "
                  f"(target within 10 %): {met(abs(growth) <= 0.10)}")
    size_note = "the issue's size" if lines >= 100_000 else (
        f"the issue's 100 000 would take about {100_000 / max(figure('run-batch'), 1) / 60:.0f} minutes a round here")
    return f"""
## Batch jobs: run-batch vs online server vs the runtime's ceiling, embeddings — {now_utc()}

- command: `{command}`
- machine: {machine()} (shared with other jobs while measured: compare rows of this table only); {load}
- the load generator's sentence mix (a quarter long): {lines} distinct sentences for the ceiling and the job, one a
  line ({size_note}); the online server
  gets the load generator's own pool of 256 of them; each in its default layout (the server: the process backend, one
  single-threaded worker per core; run-batch: the model on a thread of its process, with both cores); {len(rounds)}
  rounds, each running the three in turn (the server stays up), medians shown; the ratios are the medians of each round's ratio

{markdown_table(["system", "run", "sentences/s (median)", "each round", "notes"], rows)}

- run-batch vs online server at c=64: **{vs_online:.2f}×** (target ≥ 1.1×): {met(vs_online >= 1.1)}
- run-batch vs the runtime's length-sorted ceiling: **{vs_ceiling:.2f}×** (target ≥ 0.95×): {met(vs_ceiling >= 0.95)}{memory}
"""


# --------------------------------------------------------------------------- generation

#: what a user asks of a sentence: instructions of a data-labelling or rewriting job
INSTRUCTIONS = (
    "Summarize in one sentence: {text}",
    "Write a short headline for this: {text}",
    "Is the tone of this sentence positive, negative or neutral? Explain briefly. {text}",
    "Rewrite this more simply: {text}",
    "List three questions a reader might ask about this: {text}",
    "Continue this story with two sentences: {text}",
)
SYSTEM = "You are a helpful assistant. Answer briefly and clearly."


def chat_bodies(count: int, max_tokens: int, seed: int = 22) -> list[dict]:
    """``count`` chat completion bodies: an instruction over one of the load generator's sentences
    (a quarter long), every other one with a system message; greedy, ``max_tokens`` each."""
    import random

    from batchserve.bench.bodies import sentences

    rng = random.Random(seed)
    bodies = []
    for index, text in enumerate(sentences(count, seed=seed)):
        messages = [{"role": "system", "content": SYSTEM}] if index % 2 == 0 else []
        messages.append({"role": "user", "content": rng.choice(INSTRUCTIONS).format(text=text)})
        bodies.append({"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    return bodies


def chat_job_file(path: Path, bodies: list[dict]) -> None:
    with open(path, "wb") as file:
        for index, body in enumerate(bodies):
            file.write(orjson.dumps({"custom_id": f"p{index}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            file.write(b"\n")


def completion_tokens(output: Path) -> int:
    """Completion tokens of every answer in a job's output file, from each answer's usage."""
    total = 0
    with open(output, "rb") as file:
        for raw in file:
            total += orjson.loads(raw)["response"]["body"]["usage"]["completion_tokens"]
    return total


async def _send_all(url: str, bodies: list[dict], clients: int) -> dict:
    import httpx

    pending = iter(bodies)
    tokens = errors = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        for body in pending:  # one shared iterator: each client takes the next request
            response = await client.post(url + "/v1/chat/completions", json=body)
            if response.status_code == 200:
                tokens += response.json()["usage"]["completion_tokens"]
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "completion_tokens": tokens, "errors": errors}


def online_generation(server: Server, bodies: list[dict], clients: int) -> dict:
    figures = asyncio.run(_send_all(server.url, bodies, clients))
    answered = len(bodies) - figures["errors"]
    return {**figures, "prompts_per_s": answered / figures["seconds"], "tokens_per_s": figures["completion_tokens"] / figures["seconds"]}


def run_batch_generation(source: Path, output: Path, prompts: int) -> dict:
    figures = run_batch(source, output, prompts, app="generation")
    tokens = completion_tokens(output)
    return {"seconds": figures["seconds"], "completion_tokens": tokens, "errors": 0,
            "prompts_per_s": prompts / figures["seconds"], "tokens_per_s": tokens / figures["seconds"]}


def generation_section(rounds: list[dict], prompts: int, max_tokens: int, clients: int, command: str, load: str) -> str:
    def each(name: str, figure: str) -> str:
        return " / ".join(f"{r[name][figure]:.1f}" for r in rounds)

    def mid(name: str, figure: str) -> float:
        return median([r[name][figure] for r in rounds])

    ratio = [r["run-batch"]["tokens_per_s"] / r["online"]["tokens_per_s"] for r in rounds]
    prompt_ratio = [r["run-batch"]["prompts_per_s"] / r["online"]["prompts_per_s"] for r in rounds]
    errors = sum(r["online"]["errors"] for r in rounds)
    rows = [
        [f"online server, {clients} clients (httpx)", mid("online", "prompts_per_s"), each("online", "prompts_per_s"),
         mid("online", "tokens_per_s"), each("online", "tokens_per_s"), f"{mid('online', 'completion_tokens'):.0f}", f"errors: {errors}"],
        ["`batchserve run-batch --app generation`", mid("run-batch", "prompts_per_s"), each("run-batch", "prompts_per_s"),
         mid("run-batch", "tokens_per_s"), each("run-batch", "tokens_per_s"), f"{mid('run-batch', 'completion_tokens'):.0f}", "—"],
    ]
    return f"""
## Batch jobs: run-batch vs online server, generation — {now_utc()}

- command: `{command}`
- machine: {machine()} (shared with other jobs while measured: compare rows of this table only); {load}
- {prompts} chat completions on the bundled SmolLM2 (an instruction over one of the load generator's sentences, a
  quarter long; every other one with a system message), `max_tokens` {max_tokens}, temperature 0 (both sides decode
  the same greedy answers; an answer may stop before `max_tokens`); each in its default layout (`--app generation`:
  the llama.cpp runtime on a CPU, {clients} rows decoding together); the online server gets the same requests in the
  file's order from {clients} clients, each sending the next as its last is answered; run-batch's seconds are its own
  summary's (the model loaded before its clock starts); completion tokens from each answer's `usage`; {len(rounds)}
  rounds, each running the two in turn (the server stays up), medians shown

{markdown_table(["system", "prompts/s (median)", "each round", "completion tokens/s (median)", "each round",
                 "completion tokens", "notes"], rows)}

- run-batch vs online server at c={clients}: **{median(prompt_ratio):.2f}×** prompts/s, **{median(ratio):.2f}×** completion tokens/s
  (rounds: {" / ".join(f"{value:.2f}" for value in ratio)}); the issue sets no target for generation
"""


def bench_generation(args: argparse.Namespace, command_line: str) -> str:
    load = LoadAverage()
    bodies = chat_bodies(args.prompts, args.max_tokens)
    warmup = chat_bodies(CLIENTS, args.max_tokens, seed=23)  # other sentences: nothing of the job in a cache
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        source, output = Path(folder) / "prompts.jsonl", Path(folder) / "answers.jsonl"
        chat_job_file(source, bodies)
        command = [sys.executable, "-m", "batchserve.cli", "serve", "--app", "generation"]
        with Server("batch-online-generation", command) as server:
            online_generation(server, warmup, CLIENTS)
            for number in range(1, args.rounds + 1):
                figures: dict = {}
                print(f"generation round {number}: online, c={CLIENTS} ...", file=sys.stderr)
                figures["online"] = online_generation(server, bodies, CLIENTS)
                print(f"generation round {number}: run-batch ...", file=sys.stderr)
                figures["run-batch"] = run_batch_generation(source, output, args.prompts)
                print({name: (round(f["prompts_per_s"], 2), round(f["tokens_per_s"], 1)) for name, f in figures.items()},
                      file=sys.stderr)
                rounds.append(figures)
    return generation_section(rounds, args.prompts, args.max_tokens, CLIENTS, command_line, load.line())


def bench_embeddings(args: argparse.Namespace, command_line: str) -> str:
    from batchserve.bench.bodies import sentences

    load = LoadAverage()
    texts = sentences(args.lines, seed=22)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        source, output = Path(folder) / "job.jsonl", Path(folder) / "out.jsonl"
        job_file(source, texts)
        ceiling = Ceiling(texts)
        command = [sys.executable, "-m", "batchserve.cli", "serve", "--app", "embeddings"]
        with Server("batch-online", command) as server:
            for number in range(1, args.rounds + 1):
                figures: dict = {}
                print(f"round {number}: ceiling ...", file=sys.stderr)
                figures["ceiling"] = ceiling.measure()
                print(f"round {number}: online, c=64 ...", file=sys.stderr)
                figures["online"] = online(server, args.duration)
                print(f"round {number}: run-batch ...", file=sys.stderr)
                figures["run-batch"] = run_batch(source, output, args.lines)
                print({name: round(f["sentences_per_s"], 1) for name, f in figures.items()}, file=sys.stderr)
                rounds.append(figures)
        del ceiling
    return section(rounds, args.lines, args.duration, command_line, load.line())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("embeddings", "generation", "all"), default="all", help="which part to measure")
    parser.add_argument("--lines", type=int, default=LINES, help="embeddings: lines of the job (the issue's 100 000 take long on 2 cores)")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="generation: prompts of the job (the issue's 500)")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="generation: max_tokens of every prompt")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each part's measurements, taking turns")
    parser.add_argument("--duration", type=float, default=15.0, help="embeddings: seconds of each online measurement")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args()

    def command_line(*names: str) -> str:
        given = " ".join(f"--{name.replace('_', '-')} {getattr(args, name)}" for name in names
                         if getattr(args, name) != parser.get_default(name))
        return "make bench-batch" + (f" BENCH_BATCH_ARGS='{given}'" if given else "")

    if args.part in ("embeddings", "all"):
        text = bench_embeddings(args, command_line("part", "lines", "rounds"))
        publish(text, write=not args.no_write)
    if args.part in ("generation", "all"):
        text = bench_generation(args, command_line("part", "prompts", "max_tokens", "rounds"))
        publish(text, write=not args.no_write)


if __name__ == "__main__":
    main()
