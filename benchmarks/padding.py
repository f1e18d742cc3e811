"""CPU cost per sentence of all-MiniLM-L6-v2 by how a batch of 64 is run: the evidence for
running CPU batches in length-grouped passes (``EmbeddingModel.texts_per_pass``).

Measured as the thread's own CPU time with one torch thread, so other jobs on a shared
machine barely move the figures (unlike wall-clock throughput).  Appends to RESULTS.md.

    .venv/bin/python benchmarks/padding.py
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from harness import LoadAverage, RawEncoder, machine, markdown_table, now_utc, publish

BATCH = 64


def cpu_ms_per_sentence(run, count: int) -> float:
    started = time.thread_time()
    run()
    return 1000 * (time.thread_time() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="batches of 64 sentences measured per way")
    args = parser.parse_args()
    load = LoadAverage()
    torch.set_num_threads(1)
    raw = RawEncoder()
    encode = raw.encoder.encode
    batches = [raw.pool[i * BATCH : (i + 1) * BATCH] for i in range(args.batches)]
    encode(batches[0], batch_size=BATCH)  # warm-up
    ways = {
        "one sentence at a time": lambda batch: [encode([text]) for text in batch],
        "one pass of 64 (padded to the longest)": lambda batch: encode(batch, batch_size=BATCH),
        **{f"passes of {n}, grouped by length": functools.partial(encode, batch_size=n) for n in (8, 16, 32)},
    }
    rows = []
    for name, way in ways.items():
        figures = [cpu_ms_per_sentence(functools.partial(way, batch), len(batch)) for batch in batches]
        rows.append([name, sum(figures) / len(figures), min(figures), max(figures)])
    table = markdown_table(["how a batch of 64 runs", "CPU ms / sentence", "min", "max"], rows)
    text = f"""
## Padding: CPU cost per sentence by how a batch runs — {now_utc()}

- command: `.venv/bin/python benchmarks/padding.py`
- machine: {machine()}; {load.line()}
- one torch thread, the thread's own CPU time, {args.batches} batches of 64 bench sentences (a quarter long)

{table}
"""
    publish(text)


if __name__ == "__main__":
    main()
