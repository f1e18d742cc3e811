"""What the benchmark scripts share: servers on loopback, load from `batchserve bench`, the
raw in-process ceiling, and rows in benchmarks/RESULTS.md with machine, date and command.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PEERS = ROOT / "benchmarks" / "peers"
ENV = {
    **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),  # this checkout's package, whatever is installed
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process on a free loopback port: ``command`` gets ``--port PORT`` appended.

    Used as a context manager; it is ready once ``GET ready_path`` answers 200, and it is
    stopped (terminate, then kill) on exit.
    """

    def __init__(
        self, name: str, command: list[str], ready_path: str = "/readyz", ready_timeout: float = 180.0, cwd: Path = ROOT
    ):
        self.name = name
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [*command, "--port", str(self.port)]
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None
        self.log = Path(tempfile.gettempdir()) / f"batchserve-bench-{name}.log"

    def __enter__(self) -> "Server":
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(  # own process group: stop() reaches its workers too
                self.command, cwd=self.cwd, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not ready after {self.ready_timeout:g} s; see {self.log}")

    def stop(self) -> None:
        """Terminate the server and every process it started (peers fork workers), then reap."""
        if self.process is None:
            return
        group = self.process.pid
        _signal_group(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        time.sleep(0.5)
        _signal_group(group, signal.SIGKILL)  # whatever ignored SIGTERM


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


def drive(url: str, concurrency: int, duration: float, warmup: float = 2.0, path: str = "/v1/embeddings") -> dict:
    """`batchserve bench` in its own process: a warm-up run, then the measured one (its JSON)."""
    if warmup > 0:
        _bench(url + path, concurrency, warmup)
    return _bench(url + path, concurrency, duration)


def _bench(url: str, concurrency: int, duration: float) -> dict:
    command = [sys.executable, "-m", "batchserve.cli", "bench", url, "--app", "embeddings",
               "--concurrency", str(concurrency), "--duration", str(duration), "--timeout", "60", "--json"]
    finished = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=duration + 180)
    if not finished.stdout.strip():
        raise RuntimeError(f"batchserve bench gave no summary:\n{finished.stderr}")
    return json.loads(finished.stdout)


class RawEncoder:
    """In-process ``encode`` on batches of bench sentences: the ceiling (no HTTP, no JSON).

    ``runtime`` "sentence-transformers": one padded pass per batch (torch fp32);
    "onnx" with ``quantize`` "none" or "int8": batchserve's ONNX runtime with all cores in
    this one process, each batch run as the length-sorted passes of the server's token
    budget (``max_batch_tokens``), as a batcher would.
    """

    def __init__(self, runtime: str = "sentence-transformers", quantize: str = "none", max_batch_tokens: int = 256):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from batchserve.apps.embeddings import bundled_model_path
        from batchserve.bench.bodies import sentences

        self.pool = sentences(256)  # the same texts, in the same order, as the HTTP load sends
        if runtime == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            self.encoder = model = SentenceTransformer(bundled_model_path(), device="cpu", local_files_only=True)
            self.encode = lambda batch: model.encode(batch, batch_size=len(batch), convert_to_numpy=True)
        else:
            from batchserve.batching import length_passes
            from batchserve.runtimes.onnx.encoder import OnnxEncoder

            self.encoder = model = OnnxEncoder(bundled_model_path(), threads=os.cpu_count(), quantize=quantize)
            model.load()

            def encode(batch: list[str]):
                groups = length_passes(model.token_counts(batch), len(batch), max_batch_tokens)
                return [model.encode([batch[i] for i in group]) for group in groups]

            self.encode = encode

    def measure(self, duration: float, batch_size: int = 64, warmup: int = 2) -> dict:
        pool = self.pool
        batches = [pool[i : i + batch_size] for i in range(0, len(pool) - batch_size + 1, batch_size)]
        for batch in batches[:warmup]:
            self.encode(batch)
        seconds, count, started = [], 0, time.perf_counter()
        while time.perf_counter() - started < duration:
            began = time.perf_counter()
            self.encode(batches[count % len(batches)])
            seconds.append(time.perf_counter() - began)
            count += 1
        elapsed = time.perf_counter() - started
        return {
            "sentences_per_s": count * batch_size / elapsed,
            "batches": count,
            "batch_ms_p50": 1000 * float(np.percentile(seconds, 50)),
            "batch_ms_p99": 1000 * float(np.percentile(seconds, 99)),
        }


def raw_encode(duration: float, batch_size: int = 64, **encoder) -> dict:
    """One :class:`RawEncoder` measurement (loads the model, measures, lets it go)."""
    return RawEncoder(**encoder).measure(duration, batch_size)


def merge_rounds(summaries: list[dict]) -> dict:
    """Several `batchserve bench` summaries of one system and load as one: mean req/s,
    median of each latency figure, errors added up, mean batch size."""
    merged = dict(summaries[-1])
    merged["throughput"] = float(np.mean([s["throughput"] for s in summaries]))
    names = set.intersection(*(set(s["latency_ms"]) for s in summaries))
    merged["latency_ms"] = {name: float(np.median([s["latency_ms"][name] for s in summaries])) for name in names}
    errors: dict[str, int] = {}
    for summary in summaries:
        for status, count in summary["errors"].items():
            errors[status] = errors.get(status, 0) + count
    merged["errors"] = errors
    means = [mean_batch(s) for s in summaries if mean_batch(s) is not None]
    if means:
        model = next(iter(merged["batch_sizes"]))
        merged["batch_sizes"] = {model: {**merged["batch_sizes"][model], "mean": float(np.mean(means))}}
    merged["rounds"] = len(summaries)
    return merged


def machine() -> str:
    import torch

    import batchserve

    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({_cpu_model()}), "
        f"{_memory_gib():.0f} GiB RAM; Python {platform.python_version()}, torch {torch.__version__}, "
        f"batchserve {batchserve.__version__}"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


class LoadAverage:
    """The machine's 1-minute load average when a benchmark started, and now, as a line."""

    def __init__(self):
        self.before = os.getloadavg()[0]

    def line(self) -> str:
        return f"load average {self.before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores)"


def publish(text: str, write: bool = True) -> None:
    """Print a benchmark's section and, unless told not to, put it in RESULTS.md (replacing its last run's)."""
    print(text)
    if write:
        append_results(text)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def section_key(section: str) -> str | None:
    """What identifies a benchmark's section: its ``## `` title without the date after " — " and
    without a parenthesized label at its end (``Soak (`make soak`)`` → ``Soak``); None without one."""
    match = re.match(r"## (.+)", section.lstrip())
    if not match:
        return None
    title = match.group(1).split(" — ")[0].strip()
    return re.sub(r"\s*\([^()]*\)$", "", title)


def replace_section(results: str, section: str) -> str:
    """``results`` with ``section`` in place of the section of the same benchmark, else added last.

    RESULTS.md keeps one current section per benchmark (older runs are in git history): sections
    start at ``## `` headings and are matched by :func:`section_key`; the preamble before the
    first one, and sections no benchmark writes (the headline table), are never touched.
    """
    section = section.strip() + "\n"
    parts = re.split(r"(?m)^(?=## )", results)
    preamble, sections = parts[0], parts[1:]
    key = section_key(section)
    for index, old in enumerate(sections):
        if key is not None and section_key(old) == key:
            sections[index] = section + ("\n" if index < len(sections) - 1 else "")
            return preamble + "".join(sections)
    if sections and not sections[-1].endswith("\n\n"):
        sections[-1] = sections[-1].rstrip("\n") + "\n\n"
    elif not sections and not preamble.endswith("\n\n"):
        preamble = preamble.rstrip("\n") + "\n\n"
    return preamble + "".join(sections) + section


def append_results(section: str) -> None:
    """Put a section into RESULTS.md in place of its benchmark's last one (see :func:`replace_section`)."""
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\n"
            "One section per benchmark, its latest run: a script replaces its own section when it runs\n"
            "again; older runs are in git history.\n"
        )
    RESULTS.write_text(replace_section(RESULTS.read_text(), section))
    print(f"{RESULTS.relative_to(ROOT)}: section '{section_key(section)}' written; update its row of the headline table by hand")


def latency(summary: dict, name: str) -> float | None:
    return summary["latency_ms"].get(name)


def mean_batch(summary: dict) -> float | None:
    sizes = summary.get("batch_sizes") or {}
    return next(iter(sizes.values()))["mean"] if sizes else None


def errors(summary: dict) -> str:
    return ", ".join(f"{status}×{count}" for status, count in summary["errors"].items()) or "0"
