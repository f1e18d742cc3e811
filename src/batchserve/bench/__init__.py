"""Load generation and benchmarks: ``batchserve bench URL`` and the scripts in ``benchmarks/``.

bodies (what to send) → load (how: closed or open loop) → scrape (the server's batch
sizes) → report (the figures).
"""

from batchserve.bench.bodies import TEMPLATES, request_bodies, sentences
from batchserve.bench.load import LoadPlan, LoadResult, Outcome, run_load
from batchserve.bench.report import Summary, render, summarize
from batchserve.bench.run import NotServedError, run_bench

__all__ = [
    "TEMPLATES",
    "LoadPlan",
    "LoadResult",
    "NotServedError",
    "Outcome",
    "Summary",
    "render",
    "request_bodies",
    "run_bench",
    "run_load",
    "sentences",
    "summarize",
]
