"""The asyncio load generator: closed loop (fixed concurrency) or open loop (fixed rate).

* **Closed loop** — ``concurrency`` clients, each sending its next request as soon as
  the previous one answered.  Latency is measured from the moment a request was sent.
* **Open loop** — a request leaves every ``1 / rate`` seconds whatever the server does,
  so an overloaded server shows up as growing latency and errors instead of a slower
  client.  Latency is measured from the moment the request was *due*, which counts the
  time it waited for a free connection (no coordinated omission).

Both stop at ``duration`` seconds or after ``requests`` requests, whichever comes first;
requests still running then are awaited (each is bounded by ``timeout``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

PROGRESS_INTERVAL = 0.2  # seconds between progress callbacks
OPEN_LOOP_CONNECTIONS = 1024  # most connections an open-loop run may hold at once


@dataclass
class LoadPlan:
    url: str
    bodies: list[bytes]
    concurrency: int | None = 1
    rate: float | None = None
    duration: float = 10.0
    requests: int | None = None
    timeout: float = 30.0
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give either a concurrency (closed loop) or a rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0 requests per second")
        if self.duration <= 0:
            raise ValueError("duration must be > 0 seconds")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be at least 1")
        if not self.bodies:
            raise ValueError("no request bodies")

    @property
    def mode(self) -> str:
        return "closed" if self.rate is None else "open"

    @property
    def connections(self) -> int:
        return self.concurrency if self.concurrency is not None else OPEN_LOOP_CONNECTIONS


@dataclass
class Outcome:
    """One request: when it was due (s from the start), how long it took, how it ended."""

    due: float
    latency: float
    status: str  # "200", "503", ... or what went wrong ("ConnectError", "Timeout", ...)

    @property
    def ok(self) -> bool:
        return self.status.startswith("2")


@dataclass
class LoadResult:
    plan: LoadPlan
    outcomes: list[Outcome]
    elapsed: float  # first request due → last request answered


Progress = Callable[[int, float], None]  # (requests answered, seconds elapsed)


async def run_load(plan: LoadPlan, progress: Progress | None = None) -> LoadResult:
    """Drive ``plan`` against its URL and return every request's outcome."""
    outcomes: list[Outcome] = []
    async with _session(plan) as session:
        start = time.perf_counter()
        sender = _Sender(session, plan, start, outcomes)
        reporter = asyncio.create_task(_report_progress(outcomes, start, progress))
        try:
            if plan.rate is None:
                await _closed_loop(sender, plan)
            else:
                await _open_loop(sender, plan)
        finally:
            reporter.cancel()
        elapsed = time.perf_counter() - start
    if progress is not None:
        progress(len(outcomes), elapsed)
    return LoadResult(plan, outcomes, elapsed)


def _session(plan: LoadPlan) -> aiohttp.ClientSession:
    """Up to ``plan.connections`` keep-alive connections.

    aiohttp rather than httpx here: httpcore's pool scans every connection on each
    request, and httpx's per-request cost is a few times aiohttp's, so at 64 connections
    and more the generator's own CPU, on the same machine as the server, would be measured.
    """
    connector = aiohttp.TCPConnector(limit=plan.connections, limit_per_host=plan.connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=plan.timeout)
    headers = {"content-type": "application/json", **plan.headers}
    return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)


class _Sender:
    """Sends body number ``i`` and records its outcome."""

    def __init__(self, session: aiohttp.ClientSession, plan: LoadPlan, start: float, outcomes: list[Outcome]):
        self.session = session
        self.plan = plan
        self.start = start
        self.outcomes = outcomes

    async def send(self, index: int, due: float) -> None:
        body = self.plan.bodies[index % len(self.plan.bodies)]
        try:
            async with self.session.post(self.plan.url, data=body) as response:
                await response.read()
                status = str(response.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            status = _error_name(error)
        finished = time.perf_counter()
        self.outcomes.append(Outcome(due - self.start, finished - due, status))


def _error_name(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "Timeout"
    if isinstance(error, aiohttp.ClientConnectorError):
        return "ConnectError"
    return type(error).__name__


async def _closed_loop(sender: _Sender, plan: LoadPlan) -> None:
    end = sender.start + plan.duration
    numbers = itertools.count() if plan.requests is None else iter(range(plan.requests))

    async def client() -> None:
        for index in numbers:  # shared: each number is taken by exactly one client
            now = time.perf_counter()
            if now >= end:
                return
            await sender.send(index, now)

    await asyncio.gather(*(client() for _ in range(plan.concurrency)))


async def _open_loop(sender: _Sender, plan: LoadPlan) -> None:
    end = sender.start + plan.duration
    running: set[asyncio.Task] = set()
    for index in itertools.count():
        if plan.requests is not None and index >= plan.requests:
            break
        due = sender.start + index / plan.rate
        if due >= end:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(sender.send(index, due))
        running.add(task)
        task.add_done_callback(running.discard)
    if running:
        await asyncio.gather(*running)


async def _report_progress(outcomes: list[Outcome], start: float, progress: Progress | None) -> None:
    if progress is None:
        return
    while True:
        progress(len(outcomes), time.perf_counter() - start)
        await asyncio.sleep(PROGRESS_INTERVAL)
