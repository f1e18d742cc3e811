"""`make bench-overhead`: the server's own CPU cost per request, with a zero-cost model.

Each configuration is a server on loopback whose model costs nothing
(benchmarks/zero_model.py), driven by wrk with 64 connections, one short sentence per
request.  Over a measured run (after a warm-up) the CPU time (user + system, every thread)
of the server process and of every process under it (process-backend workers) is read from
/proc/PID/stat; CPU per request = that time / requests answered.  This figure depends far
less on other load on the machine than req/s does; the 1-minute load average is recorded
with each round, and a round taken at a load above LOAD_LIMIT is repeated (up to
MAX_ROUNDS rounds in all), the table giving the median.

Configurations:
* ``embeddings``: ``POST /v1/embeddings`` (thread backend), the hot path of issue 11;
* ``embeddings-process``: the same with the default CPU layout (process backend, one worker
  per core), workers' CPU included;
* ``embeddings-key``: ``embeddings`` with ``--api-key``, every request sending it
  (``Authorization: Bearer``): with ``embeddings`` beside it, what the key check costs;
* ``predict``: ``POST /models/zero/predict`` (thread backend), a user model's route;
* ``floor``: a bare ASGI app on uvicorn with the server's uvicorn settings, reading the body
  and answering a constant embeddings answer of the same size: what HTTP alone costs.

The key check alone is also timed in this process (:func:`key_check_cost`): the API-key
middleware's ASGI call around an app that answers nothing, minus that app called directly.
The difference of two server figures is a small number between two noisy ones; this is the
middleware's own cost, exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from harness import Server, machine, markdown_table, now_utc, publish

from batchserve.bench.bodies import sentence

LOAD_LIMIT = 3.0
MAX_ROUNDS = 4
CONNECTIONS = 64
BENCH_KEY = "bench-overhead-key-0123456789abcdef"  # 36 characters, as a generated key might be
SERVE = [sys.executable, "benchmarks/zero_model.py", "serve", "--max-batch-size", "64"]
CONFIGS = {  # name -> (server command, request path, body builder)
    "embeddings": (
        [*SERVE, "--app", "embeddings", "--backend", "thread"],
        "/v1/embeddings",
        lambda text: {"input": [text], "model": "all-MiniLM-L6-v2"},
    ),
    "embeddings-key": (
        [*SERVE, "--app", "embeddings", "--backend", "thread", "--api-key", BENCH_KEY],
        "/v1/embeddings",
        lambda text: {"input": [text], "model": "all-MiniLM-L6-v2"},
    ),
    "embeddings-process": (
        [*SERVE, "--app", "embeddings"],
        "/v1/embeddings",
        lambda text: {"input": [text], "model": "all-MiniLM-L6-v2"},
    ),
    "predict": (
        [*SERVE, "--model", "zero=zero_model:predict", "--backend", "thread"],
        "/models/zero/predict",
        lambda text: {"inputs": [text]},
    ),
    "floor": (
        [sys.executable, "-m", "uvicorn", "--app-dir", "benchmarks", "zero_model:floor_app", "--no-access-log", "--log-level", "warning"],
        "/v1/embeddings",
        lambda text: {"input": [text], "model": "all-MiniLM-L6-v2"},
    ),
}
DESCRIPTIONS = {
    "embeddings": "`POST /v1/embeddings`, thread backend",
    "embeddings-key": "`POST /v1/embeddings`, thread backend, `--api-key` (each request sends it)",
    "embeddings-process": "`POST /v1/embeddings`, default layout (process backend, 2 workers; their CPU counted)",
    "predict": "`POST /models/zero/predict`, thread backend",
    "floor": "bare ASGI app on uvicorn (reads the body, answers a constant embeddings answer)",
}


# --------------------------------------------------------------------------- measuring


def wrk_script(path: str, build, directory: Path, count: int = 256, key: str | None = None) -> Path:
    """A wrk Lua script cycling through ``count`` bodies of one short sentence each (with the API key, if given)."""
    rng = random.Random(0)
    bodies = [orjson.dumps(build(sentence(rng, long=False))).decode() for _ in range(count)]
    lines = ",\n".join("  " + _lua_string(body) for body in bodies)
    script = directory / f"wrk{path.replace('/', '-')}{'-key' if key else ''}.lua"
    authorization = f'wrk.headers["Authorization"] = "Bearer {key}"\n' if key else ""
    script.write_text(
        f"bodies = {{\n{lines}\n}}\n"
        "counter = 0\n"
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"{authorization}"
        "request = function()\n"
        "  counter = counter + 1\n"
        f'  return wrk.format("POST", "{path}", nil, bodies[(counter % #bodies) + 1])\n'
        "end\n"
        "done = function(summary, latency, requests)\n"
        '  io.write(string.format("RESULT requests=%d non2xx=%d errors=%d p50_ms=%.2f p99_ms=%.2f\\n",\n'
        "    summary.requests, summary.errors.status,\n"
        "    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,\n"
        "    latency:percentile(50) / 1000, latency:percentile(99) / 1000))\n"
        "end\n"
    )
    return script


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk(url: str, script: Path, seconds: float) -> dict:
    finished = subprocess.run(
        ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "-s", str(script), url],
        check=False, capture_output=True, text=True, timeout=seconds + 60,
    )
    found = re.search(r"RESULT requests=(\d+) non2xx=(\d+) errors=(\d+) p50_ms=([\d.]+) p99_ms=([\d.]+)", finished.stdout)
    if found is None:
        raise RuntimeError(f"wrk gave no summary:\n{finished.stdout}\n{finished.stderr}")
    requests, non2xx, errors = (int(found.group(i)) for i in (1, 2, 3))
    return {"requests": requests, "non2xx": non2xx, "errors": errors,
            "p50_ms": float(found.group(4)), "p99_ms": float(found.group(5))}


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process ``root`` and every live process under it."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])  # after "pid (comm)": state, ppid, ...
        times[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    total = 0.0
    for pid, seconds in times.items():
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == root:
            total += seconds
    return total


def measure_round(server: Server, script: Path, seconds: float, warmup: float) -> dict:
    if warmup > 0:
        wrk(server.url, script, warmup)
    load_before = os.getloadavg()[0]
    cpu_before, started = cpu_seconds(server.process.pid), time.monotonic()
    result = wrk(server.url, script, seconds)
    cpu, elapsed = cpu_seconds(server.process.pid) - cpu_before, time.monotonic() - started
    load_after = os.getloadavg()[0]
    if result["non2xx"] or result["errors"] or not result["requests"]:
        raise RuntimeError(f"{server.name}: wrk saw failures: {result}; see {server.log}")
    return {
        **result,
        "ms_cpu_per_request": 1000 * cpu / result["requests"],
        "requests_per_s": result["requests"] / elapsed,
        "cpu_share": cpu / elapsed,
        "load": max(load_before, load_after),
        "loads": (load_before, load_after),
    }


#: measured side by side (both servers up, their rounds taking turns), so that a change in the
#: machine's load falls on both alike: the API key's cost is their difference, round by round
SIDE_BY_SIDE = ("embeddings", "embeddings-key")


def measure(configs: list[str], seconds: float, warmup: float, rounds: int, directory: Path) -> dict[str, dict]:
    """Each configuration's rounds and medians; several configurations' servers are all up and
    their rounds take turns."""
    scripts = {}
    for config in configs:
        command, path, build = CONFIGS[config]
        scripts[config] = wrk_script(path, build, directory, key=BENCH_KEY if "--api-key" in command else None)
    taken: dict[str, list[dict]] = {config: [] for config in configs}

    def more() -> bool:
        done = len(taken[configs[0]])
        loaded = done and max(taken[config][-1]["load"] for config in configs) > LOAD_LIMIT
        return done < rounds or (loaded and done < MAX_ROUNDS)

    with contextlib.ExitStack() as stack:
        servers = {config: stack.enter_context(Server(f"overhead-{config}", CONFIGS[config][0])) for config in configs}
        while more():
            for config in configs:
                figure = measure_round(servers[config], scripts[config], seconds, warmup if not taken[config] else 1.0)
                print(f"{config}: {figure['ms_cpu_per_request']:.3f} ms CPU/request, {figure['requests_per_s']:.0f} req/s, "
                      f"load {figure['loads'][0]:.1f} -> {figure['loads'][1]:.1f}", file=sys.stderr)
                taken[config].append(figure)
    return {config: _summary(rounds_taken) for config, rounds_taken in taken.items()}


def _summary(taken: list[dict]) -> dict:
    return {
        "rounds": taken,
        "ms_cpu_per_request": statistics.median(r["ms_cpu_per_request"] for r in taken),
        "requests_per_s": statistics.median(r["requests_per_s"] for r in taken),
        "p50_ms": statistics.median(r["p50_ms"] for r in taken),
        "cpu_share": statistics.median(r["cpu_share"] for r in taken),
        "load": (min(min(r["loads"]) for r in taken), max(max(r["loads"]) for r in taken)),
    }


def key_check_cost(keys: int, requests: int = 100_000, rounds: int = 7) -> float:
    """Microseconds the API-key middleware adds to one request with a valid key, ``keys`` keys
    configured: its ASGI call around an app that does nothing, minus that app's own call (the
    median of ``rounds`` rounds of ``requests`` requests).  The request has the headers a client
    sends (wrk's, plus ``Authorization``), the key last of them."""
    import asyncio

    from batchserve.server.auth import PUBLIC_PATHS, ApiKeyMiddleware

    async def nothing(scope, receive, send) -> None:
        return None

    checked = ApiKeyMiddleware(nothing, keys=[*(f"other-key-{i:026d}" for i in range(keys - 1)), BENCH_KEY], public=PUBLIC_PATHS)
    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"), (b"content-length", b"80"),
               (b"authorization", f"Bearer {BENCH_KEY}".encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": headers}

    async def loop(app) -> float:
        started = time.perf_counter()
        for _ in range(requests):
            await app(scope, None, None)
        return time.perf_counter() - started

    async def measure_both() -> list[float]:
        differences = []
        for _ in range(rounds):
            differences.append(await loop(checked) - await loop(nothing))
        return differences

    return 1e6 * statistics.median(asyncio.run(measure_both())) / requests


def section(figures: dict, label: str, command: str, seconds: float, key_costs: dict[int, float]) -> str:
    rows = []
    for config, figure in figures.items():
        spread = [r["ms_cpu_per_request"] for r in figure["rounds"]]
        rows.append([
            DESCRIPTIONS[config], f"{figure['ms_cpu_per_request']:.3f}",
            f"{min(spread):.3f}-{max(spread):.3f} ({len(spread)})", f"{figure['requests_per_s']:.0f}",
            f"{figure['cpu_share']:.2f}", f"{figure['p50_ms']:.1f}", f"{figure['load'][0]:.1f}-{figure['load'][1]:.1f}",
        ])
    header = ["server", "ms CPU / request", "rounds (min-max, n)", "req/s", "server CPU cores busy", "p50 ms", "load avg"]
    key_line = ""
    if "embeddings" in figures and "embeddings-key" in figures:
        pairs = zip(figures["embeddings"]["rounds"], figures["embeddings-key"]["rounds"])
        differences = [keyed["ms_cpu_per_request"] - plain["ms_cpu_per_request"] for plain, keyed in pairs]
        plain = [r["ms_cpu_per_request"] for r in figures["embeddings"]["rounds"]]
        key_line = (
            f"\n- API key, side by side (both servers up, rounds taking turns): `embeddings-key` - `embeddings` = "
            f"{statistics.median(differences):+.3f} ms CPU a request, the median of the rounds' differences "
            f"({', '.join(f'{d:+.3f}' for d in differences)}); the keyless server's own rounds spread "
            f"{max(plain) - min(plain):.3f} ms"
        )
    costs = ", ".join(f"{cost / 1000:.4f} ms with {keys} key{'s' if keys > 1 else ''}" for keys, cost in key_costs.items())
    key_line += f"\n- API key check alone, in process (the middleware's ASGI call, an app doing nothing inside): {costs}"
    return f"""
## Server overhead per request, zero-cost model{f' ({label})' if label else ''} — {now_utc()}

- command: `{command}`
- machine: {machine()}
- load: wrk -t2 -c{CONNECTIONS} on loopback, one short sentence per request, {seconds:g} s per round after a
  warm-up; CPU = user + system time of the server and its child processes (/proc/PID/stat) over the round;
  a round at a load average above {LOAD_LIMIT:g} is repeated (at most {MAX_ROUNDS} rounds), the median given;
  "load avg" is the 1-minute load average before/after the rounds (2 cores, shared)
- model: benchmarks/zero_model.py (a fixed 384-float vector per text; the embeddings route still counts tokens
  with the bundled tokenizer, as it does for the real model){key_line}

{markdown_table(header, rows)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per measured round")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the first round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per configuration (more if the load is high)")
    parser.add_argument("--label", default="", help="what this run measures (goes in the section's title)")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(unknown)}")
    with tempfile.TemporaryDirectory() as directory:
        together = [name for name in configs if name in SIDE_BY_SIDE]
        groups = [together] * bool(together) + [[name] for name in configs if name not in SIDE_BY_SIDE]
        figures: dict[str, dict] = {}
        for group in groups:
            figures |= measure(group, args.seconds, args.warmup, args.rounds, Path(directory))
        figures = {name: figures[name] for name in configs}
    command = "python benchmarks/overhead.py" + "".join(f" {a}" for a in sys.argv[1:])
    key_costs = {keys: key_check_cost(keys) for keys in (1, 10)}
    publish(section(figures, args.label, command, args.seconds, key_costs), write=not args.no_write)


if __name__ == "__main__":
    main()
