"""Offline batch jobs (issue 22): `batchserve run-batch` on the embeddings, side by side in one run
with the online server at c=64 and with the runtime's own length-sorted ceiling in one process.

* **ceiling**: batchserve's ONNX runtime in this process with every core, the job's sentences
  sorted by token count over the whole file and run as the token-budgeted passes the batcher
  makes (rows x longest <= 256, at most 64 rows): no HTTP, no JSON, no batcher, no padding to speak of;
* **online**: `batchserve serve --app embeddings` (its default layout) driven by
  `batchserve bench --concurrency 64`, one sentence per request (the load generator's pool);
* **run-batch**: `batchserve run-batch` (its default layout: the model on a thread of the job) on a file of the same
  sentences, one per line, its rate from its own summary (models loaded before the clock starts);
  the job's front RSS is read when its progress passes a tenth of the lines and at its last progress line.

Sentences: the load generator's mix (batchserve.bench.bodies.sentences: a quarter long).
"""

from __future__ import annotations

import argparse
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


def run_batch(source: Path, output: Path, lines: int) -> dict:
    """The job in its own process; its front's RSS read when its progress lines pass a tenth of
    the lines and at its last progress line (before it stops its models)."""
    command = [sys.executable, "-m", "batchserve.cli", "run-batch", "-i", str(source), "-o", str(output),
               "--app", "embeddings", "--log-every", "1"]
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
    return f"""
## Batch jobs: run-batch vs online server vs the runtime's ceiling, embeddings — {now_utc()}

- command: `{command}`
- machine: {machine()} (shared with other jobs while measured: compare rows of this table only); {load}
- the load generator's sentence mix (a quarter long): {lines} distinct sentences for the ceiling and the job, one a
  line (the issue's 100 000 would take about {100_000 / max(figure("run-batch"), 1) / 60:.0f} minutes a round here); the online server
  gets the load generator's own pool of 256 of them; each in its default layout (the server: the process backend, one
  single-threaded worker per core; run-batch: the model on a thread of its process, with both cores); {len(rounds)}
  rounds, each running the three in turn (the server stays up), medians shown; the ratios are the medians of each round's

{markdown_table(["system", "run", "sentences/s (median)", "each round", "notes"], rows)}

- run-batch vs online server at c=64: **{vs_online:.2f}×** (target ≥ 1.1×): {met(vs_online >= 1.1)}
- run-batch vs the runtime's length-sorted ceiling: **{vs_ceiling:.2f}×** (target ≥ 0.95×): {met(vs_ceiling >= 0.95)}{memory}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=LINES, help="lines of the job (the issue's 100 000 take long on 2 cores)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three measurements, taking turns")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of each online measurement")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args()
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
                for path in (output, output.with_name("out.errors.jsonl")):
                    path.unlink(missing_ok=True)
                figures["run-batch"] = run_batch(source, output, args.lines)
                print({name: round(f["sentences_per_s"], 1) for name, f in figures.items()}, file=sys.stderr)
                rounds.append(figures)
    chosen = (("lines", args.lines), ("rounds", args.rounds))
    given = " ".join(f"--{name} {value}" for name, value in chosen if value != parser.get_default(name))
    command_line = "make bench-batch" + (f" BENCH_BATCH_ARGS='{given}'" if given else "")
    publish(section(rounds, args.lines, args.duration, command_line, load.line()), write=not args.no_write)


if __name__ == "__main__":
    main()
