"""What one request costs Redis: commands, bytes and redis-server CPU, measured (`make bench-redis-commands`).

One redis-server (started here, no persistence), one front (`serve --app embeddings --backend
redis --max-batch-size 64`) and one `batchserve worker`, all on this machine.  For c=1 and c=64
(`batchserve bench`, one sentence a request, after a warm-up): `CONFIG RESETSTAT`, the run, then
`INFO commandstats` and `INFO stats`, and redis-server's own CPU time from /proc.  The idle
rate (the same, measured with no load: leases, heartbeats, blocking reads timing out) is
subtracted, so the figures are what the requests added.  Then redis-server's ceiling on this
machine: its CPU seconds per request at each concurrency give the requests per second one
Redis core can carry, and with a worker's measured throughput, the worker count at which one
Redis becomes the bottleneck.  Written to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager

from bench_redis import wait_for_workers, worker
from harness import LoadAverage, Server, drive, errors, free_port, latency, machine, markdown_table, now_utc, publish

PREFIX = "rc"
#: what the meter itself sends, left out of the counts
METER_COMMANDS = ("info", "config|resetstat")
#: redis-benchmark's point of comparison: an entry as large as a one-request batch's answer (384 float32)
PAYLOAD = 1536


@contextmanager
def redis_server():
    """A redis-server on a free loopback port, without persistence: its URL and port."""
    port = free_port()
    command = [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        yield f"redis://127.0.0.1:{port}/0", port
    finally:
        process.kill()
        process.wait()


class RedisMeter:
    """Deltas of one redis-server's commands (by name), network bytes and CPU time."""

    def __init__(self, url: str):
        import redis

        self.client = redis.Redis.from_url(url)

    def cpu_seconds(self) -> float:
        """redis-server's user + system CPU time (getrusage, microseconds; its main thread does the work)."""
        cpu = self.client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def reset(self) -> None:
        self.client.config_resetstat()
        self.stats_before = self.client.info("stats")
        self.cpu_before = self.cpu_seconds()
        self.started = time.monotonic()

    def read(self) -> dict:
        seconds = time.monotonic() - self.started
        cpu = self.cpu_seconds() - self.cpu_before
        stats = self.client.info("stats")
        commands = {
            name.removeprefix("cmdstat_"): values["calls"]
            for name, values in self.client.info("commandstats").items()
        }
        commands = {name: calls for name, calls in commands.items() if calls and name not in METER_COMMANDS}
        return {
            "seconds": seconds,
            "cpu": cpu,
            "commands": commands,
            "in_bytes": stats["total_net_input_bytes"] - self.stats_before["total_net_input_bytes"],
            "out_bytes": stats["total_net_output_bytes"] - self.stats_before["total_net_output_bytes"],
        }


def per_request(loaded: dict, idle: dict, requests: int) -> dict:
    """What the requests added: the loaded run less the idle rate over as many seconds."""
    scale = loaded["seconds"] / idle["seconds"]
    names = set(loaded["commands"]) | set(idle["commands"])
    added = {name: loaded["commands"].get(name, 0) - scale * idle["commands"].get(name, 0) for name in names}
    # entries (the front's batches): XADDs to the request stream, i.e. every XADD but the replies',
    # each of which comes with one EXPIRE (XACK and XDEL take every entry a worker answers at once)
    batches = max(added.get("xadd", 0) - added.get("expire", 0), 1)
    return {
        "commands": {name: value / requests for name, value in added.items() if value / requests >= 0.005},
        "total": sum(added.values()) / requests,
        "batches": batches,
        "per_batch": sum(added.values()) / batches,
        "cpu_us_batch": (loaded["cpu"] - scale * idle["cpu"]) / batches * 1e6,
        "cpu_us": (loaded["cpu"] - scale * idle["cpu"]) / requests * 1e6,
        "bytes": (loaded["in_bytes"] + loaded["out_bytes"] - scale * (idle["in_bytes"] + idle["out_bytes"])) / requests,
    }


def measure(duration: float, idle_seconds: float, concurrencies: tuple[int, ...]) -> dict:
    figures: dict = {}
    with redis_server() as (url, port), ExitStack() as stack:
        stack.enter_context(worker(url, "--prefix", PREFIX))
        wait_for_workers(url, PREFIX, 1)
        front = stack.enter_context(Server("redis-commands-front", [
            sys.executable, "-m", "batchserve.cli", "serve", "--app", "embeddings", "--backend", "redis",
            "--redis-url", url, "--prefix", PREFIX, "--max-batch-size", "64", "--drain-seconds", "0",
        ]))
        meter = RedisMeter(url)
        drive(front.url, 8, 3, warmup=0)  # warm-up: both sides' first batches, connections made
        meter.reset()
        time.sleep(idle_seconds)
        figures["idle"] = meter.read()
        for concurrency in concurrencies:
            print(f"c={concurrency} ...", file=sys.stderr)
            drive(front.url, concurrency, 2, warmup=0)
            meter.reset()
            summary = drive(front.url, concurrency, duration, warmup=0)
            loaded = meter.read()
            figures[concurrency] = {"summary": summary, "redis": loaded,
                                    "per_request": per_request(loaded, figures["idle"], summary["ok"])}
        stack.close()  # front and worker stopped: redis-benchmark gets the cores
        figures["benchmark"] = redis_benchmark(port)
    return figures


def redis_benchmark(port: int, requests: int = 200_000, clients: int = 64) -> dict[str, float]:
    """redis-benchmark's ceiling on this machine (its client on the same cores): PING, and XADD of a
    batch-answer-sized entry to a capped stream, one command per round trip (no pipelining)."""
    found = {}
    for name, command in (("PING", ["PING"]), (f"XADD {PAYLOAD} B", ["XADD", "bench", "MAXLEN", "~", "10000", "*", "data", "x" * PAYLOAD])):
        output = subprocess.run(
            [shutil.which("redis-benchmark") or "redis-benchmark", "-p", str(port), "-n", str(requests), "-c", str(clients),
             "--csv", *command], capture_output=True, text=True, timeout=300,
        ).stdout
        rows = list(csv.reader(io.StringIO(output)))
        found[name] = float(rows[-1][1])
    return found


def section(figures: dict, command: str, load: LoadAverage, duration: float) -> str:
    idle, ceiling = figures["idle"], figures["benchmark"]
    concurrencies = [key for key in figures if isinstance(key, int)]
    first = figures[concurrencies[0]]["per_request"]["commands"]
    names = sorted({name for c in concurrencies for name in figures[c]["per_request"]["commands"]}, key=lambda name: -first.get(name, 0))
    per = {c: figures[c]["per_request"] for c in concurrencies}
    summaries = {c: figures[c]["summary"] for c in concurrencies}
    header = ["", *[f"c={c}" for c in concurrencies]]
    rows = [
        ["requests answered (errors)", *[f"{summaries[c]['ok']} ({errors(summaries[c])})" for c in concurrencies]],
        ["req/s (one worker)", *[summaries[c]["throughput"] for c in concurrencies]],
        ["p50 ms", *[f"{latency(summaries[c], 'p50'):.1f}" for c in concurrencies]],
        ["requests per batch (entries: XADDs less replies' EXPIREs)",
         *[f"{summaries[c]['ok'] / per[c]['batches']:.1f}" for c in concurrencies]],
        ["**Redis commands / request**", *[f"**{per[c]['total']:.2f}**" for c in concurrencies]],
        *[[f"  {name}", *[f"{per[c]['commands'].get(name, 0):.2f}" for c in concurrencies]] for name in names],
        ["Redis commands / batch", *[f"{per[c]['per_batch']:.1f}" for c in concurrencies]],
        ["redis-server CPU µs / request", *[f"{per[c]['cpu_us']:.0f}" for c in concurrencies]],
        ["redis-server CPU µs / batch", *[f"{per[c]['cpu_us_batch']:.0f}" for c in concurrencies]],
        ["bytes in+out / request", *[f"{per[c]['bytes']:.0f}" for c in concurrencies]],
        ["redis-server CPU busy during the run",
         *[f"{figures[c]['redis']['cpu'] / figures[c]['redis']['seconds']:.1%}" for c in concurrencies]],
        ["**requests/s one Redis core carries** (1 s / CPU per request)", *[f"**{1e6 / per[c]['cpu_us']:.0f}**" for c in concurrencies]],
        ["**workers of this throughput one Redis carries**",
         *[f"**{1e6 / per[c]['cpu_us'] / summaries[c]['throughput']:.0f}**" for c in concurrencies]],
    ]
    idle_rate = sum(idle["commands"].values()) / idle["seconds"]
    busiest = sorted(idle["commands"].items(), key=lambda item: -item[1])
    idle_names = ", ".join(f"{name} {calls / idle['seconds']:.1f}/s" for name, calls in busiest)
    bench = ", ".join(f"{name} {rate:,.0f}/s" for name, rate in ceiling.items())
    return f"""
## Redis commands per request — {now_utc()}

- command: `{command}`
- machine: {machine()}; {load.line()}; redis-server {_redis_version()}
- one redis-server, one front (`serve --app embeddings --backend redis --max-batch-size 64`), one
  `batchserve worker` (default threads), all on loopback; `batchserve bench` {duration:g} s per concurrency,
  one sentence a request; `CONFIG RESETSTAT` before each run, then `INFO commandstats`, `INFO stats` and
  `INFO cpu` (redis-server's own user+system CPU); the meter's own INFO/CONFIG calls are left out
- idle (no request, {idle['seconds']:.0f} s): {idle_rate:.1f} commands/s ({idle_names}),
  redis-server CPU {idle['cpu'] / idle['seconds']:.2%} of a core; subtracted below at the same rate
- redis-benchmark on the same server afterwards (front and worker stopped; its client on the same
  cores, 64 connections, no pipelining): {bench}

{markdown_table(header, rows)}
"""


def _maybe(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def _redis_version() -> str:
    output = subprocess.run([shutil.which("redis-server") or "redis-server", "--version"], capture_output=True, text=True).stdout
    return output.split()[2].removeprefix("v=") if output else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    load = LoadAverage()
    figures = measure(args.duration, args.idle_seconds, (1, 64))
    command = "make bench-redis-commands" + (f" (--duration {args.duration:g})" if args.duration != 20.0 else "")
    publish(section(figures, command, load, args.duration), write=not args.no_write)


if __name__ == "__main__":
    main()
