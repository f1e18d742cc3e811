"""Constrained decoding (issue 21): what a constraint costs, and whether parse() always parses.

1. **Mask time per token**, each candidate library that imports (llguidance, the one used; xgrammar
   and outlines-core when installed, e.g. ``pip install --target DIR`` and ``PYTHONPATH=DIR``), on the
   bundled SmolLM2's 49,152-token vocabulary and the JSON schema of :class:`Person` (nested model,
   enum, bounded strings and integers, boolean): compile the schema, then a mask at each of the
   tokens of a valid value (and after it).
2. **A decode step with 8 constrained rows against one with 8 free rows** on the llama.cpp runtime
   (target: at most 1.3x): the runtime driven directly, a step being what the engine does (one
   ``decode`` over the 8 rows, each constrained row's mask on its logits, sampling at temperature
   0.8, the matchers told the tokens), rounds alternating free and constrained; a matcher whose
   value is complete starts again, so every step masks 8 rows.
3. **parse() over 50 requests** at temperature 0.8 (target: 100 % valid) with the official client,
   against ``batchserve serve --app generation``, 8 at a time, ``max_tokens`` 200 (the bounded
   value fits in far less).

The section goes to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import sys
import time

import numpy as np
from harness import LoadAverage, Server, machine, markdown_table, now_utc, publish

from batchserve.runtimes.bundled import BUNDLED_NAME
from tests.apps.test_openai_client import Person  # the test's model: the schema

STEP_TARGET = 1.3


def strict_schema() -> dict:
    """Person's schema as the openai client sends it for parse(): every object closed, every field required."""
    from openai.lib._pydantic import to_strict_json_schema

    return to_strict_json_schema(Person)


VALUE = Person(name="Ada Lovelace", age=36, likes_tea=True, colour="blue", address={"city": "London", "zip_code": 12345})


# --------------------------------------------------------------------------- 1. libraries


def mask_times(tokenizer) -> list[list]:
    from batchserve.generation.constraint import JSON_LAYOUT

    schema = json.dumps(strict_schema())
    ids = _compact_ids(tokenizer, JSON_LAYOUT)  # every library told to write JSON so
    rows = []
    for name, run in (("llguidance", _llguidance), ("xgrammar", _xgrammar), ("outlines-core", _outlines)):
        try:
            version, compile_seconds, times = run(tokenizer, schema, ids)
        except ImportError:
            rows.append([name, "not installed", "", ""])
            continue
        times_ms = np.array(times) * 1e3
        rows.append([
            f"{name} {version}", f"{compile_seconds * 1e3:.1f} ms",
            f"{times_ms.mean():.3f} / {np.median(times_ms):.3f} / {times_ms.max():.3f} ms", len(times),
        ])
    return rows


def _llguidance(tokenizer, schema, ids):
    import llguidance
    import llguidance.hf
    import llguidance.numpy

    from batchserve.generation.constraint import JSON_LAYOUT

    lltokenizer = llguidance.hf.from_tokenizer(tokenizer)
    started = time.perf_counter()
    matcher = llguidance.LLMatcher(lltokenizer, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT))
    compiled = time.perf_counter() - started
    bitmask = llguidance.numpy.allocate_token_bitmask(1, lltokenizer.vocab_size)
    times = []
    for token in [*ids, None]:
        started = time.perf_counter()
        llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, 0)
        times.append(time.perf_counter() - started)
        if token is not None:
            assert matcher.consume_token(token), matcher.get_error()
    return importlib.metadata.version("llguidance"), compiled, times


def _compact_ids(tokenizer, layout) -> list[int]:
    """The value written as the layout says (``", "`` and ``": "``), tokenized."""
    text = json.dumps(VALUE.model_dump(mode="json"), separators=(layout["item_separator"], layout["key_separator"]))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _xgrammar(tokenizer, schema, ids):
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgrammar.GrammarCompiler(info)
    started = time.perf_counter()
    grammar = compiler.compile_json_schema(schema, strict_mode=True, any_whitespace=False, separators=(", ", ": "))
    matcher = xgrammar.GrammarMatcher(grammar)
    compiled = time.perf_counter() - started
    bitmask = xgrammar.allocate_token_bitmask(1, len(tokenizer))
    times = []
    for token in [*ids, None]:
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        times.append(time.perf_counter() - started)
        if token is not None:
            assert matcher.accept_token(token)
    return importlib.metadata.version("xgrammar"), compiled, times


def _outlines(tokenizer, schema, ids):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from batchserve.tokens import Vocabulary as Tokens

    eos = tokenizer.eos_token_id
    table = Tokens.of(tokenizer)
    tokens: dict[bytes, list[int]] = {}
    for token_id in range(table.size):  # each token by its bytes (the vocabulary's own strings are byte-level BPE's)
        if token_id != eos and token_id not in tokenizer.all_special_ids:
            tokens.setdefault(table.token_bytes(token_id), []).append(token_id)
    vocabulary = Vocabulary(eos, tokens)
    started = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(schema), vocabulary))
    compiled = time.perf_counter() - started
    mask = np.zeros((len(tokenizer) + 31) // 32, dtype=np.int32)
    times = []
    for token in [*ids, None]:
        started = time.perf_counter()
        guide.write_mask_into(mask.ctypes.data, mask.size, 4)
        times.append(time.perf_counter() - started)
        if token is not None:
            guide.advance(token)
    return importlib.metadata.version("outlines-core"), compiled, times


# --------------------------------------------------------------------------- 2. decode steps


def step_costs(rounds: int, steps: int, threads: int) -> dict:
    import torch

    from batchserve.generation.constraint import Constraint, Constraints
    from batchserve.generation.sampling import SamplingParams, row_generator, sample
    from batchserve.runtimes.llama.lm import LlamaCausalLM

    lm = LlamaCausalLM.load(max_sequences=16, threads=threads)
    constraints = Constraints(lm.tokenizer, lm.stop_tokens)
    compiled = constraints.compile(Constraint("json_schema", json.dumps(strict_schema())))
    prompt = lm.encode("A person, as JSON:")
    params = [SamplingParams(temperature=0.8)] * 8
    figures: dict[str, list[float]] = {"free": [], "constrained": []}
    try:
        for round_index in range(rounds):
            for kind in ("free", "constrained"):
                seqs = list(range(8))
                generators = [row_generator(round_index, row) for row in seqs]
                logits = lm.prefill(seqs[:1], [prompt])
                lm.fork(0, seqs[1:])
                logits = logits.repeat(8, 1)
                matchers = [compiled.matcher() for _ in seqs] if kind == "constrained" else []
                started = time.perf_counter()
                for _ in range(steps):
                    logits = logits.float().cpu()
                    if matchers:
                        logits = logits.clone()
                        constraints.mask(logits.numpy(), seqs, matchers)
                    tokens = sample(logits, params, generators)
                    for matcher, token in zip(matchers, tokens):
                        if not matcher.consume_token(token) or matcher.is_stopped():
                            matcher.reset()
                    tokens = [token if token not in lm.stop_tokens else 198 for token in tokens]  # keep going
                    logits = lm.decode(seqs, tokens)
                figures[kind].append((time.perf_counter() - started) / steps)
                lm.release(seqs)
    finally:
        lm.close()
    del torch
    return {kind: float(np.median(values)) for kind, values in figures.items()}


# --------------------------------------------------------------------------- 3. parse()


async def parse_calls(url: str, requests: int, concurrency: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)
    outcomes: dict[str, int] = {}
    tokens: list[int] = []
    question = [
        {"role": "system", "content": "You answer in JSON."},
        {"role": "user", "content": "Describe a person who lives in Paris."},
    ]

    async def one(index: int) -> None:
        async with semaphore:
            try:
                reply = await client.chat.completions.parse(
                    model=BUNDLED_NAME, messages=question, response_format=Person, temperature=0.8, max_tokens=200, seed=index
                )
                parsed = reply.choices[0].message.parsed
                Person.model_validate_json(reply.choices[0].message.content)
                outcome = "valid" if isinstance(parsed, Person) else "no object"
                tokens.append(reply.usage.completion_tokens)
            except Exception as error:  # what a client would see, counted
                outcome = type(error).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(requests)))
    await client.close()
    return {"outcomes": outcomes, "seconds": time.perf_counter() - started, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each kind of step")
    parser.add_argument("--steps", type=int, default=48, help="decode steps a round")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--requests", type=int, default=50, help="parse() calls")
    parser.add_argument("--no-results", action="store_true", help="print the section, do not append it to RESULTS.md")
    args = parser.parse_args()

    from batchserve.runtimes.bundled import bundled_gguf_path
    from batchserve.runtimes.llama.loading import load_gguf_tokenizer

    load_average = LoadAverage()
    print("mask time per token ...", file=sys.stderr)
    libraries = mask_times(load_gguf_tokenizer(bundled_gguf_path()))
    print("decode steps, 8 free rows against 8 constrained ...", file=sys.stderr)
    steps = step_costs(args.rounds, args.steps, args.threads)
    ratio = steps["constrained"] / steps["free"]
    print(f"{args.requests} parse() calls ...", file=sys.stderr)
    command = [
        sys.executable, "-m", "batchserve.cli", "serve", "--app", "generation", "--generation-threads", str(args.threads),
        "--timeout", "300",
    ]
    with Server("constrained", command, ready_timeout=600) as server:
        parsed = asyncio.run(parse_calls(server.url, args.requests, 8))
    valid = parsed["outcomes"].get("valid", 0)
    outcomes = ", ".join(f"{count} {name}" for name, count in sorted(parsed["outcomes"].items()))
    section = "\n\n".join([
        f"## Constrained decoding (llguidance), bundled SmolLM2 — {now_utc()}",
        f"{machine()}; {load_average.line()}. `PYTHONPATH=. python benchmarks/bench_constrained.py` (`make bench-constrained`).",
        "Mask time per token: the JSON schema of a nested pydantic model (enum, bounded strings and integers, boolean), "
        "49,152-token vocabulary, a mask at each token of a valid value and after it; a library not installed is "
        "measured when `PYTHONPATH` reaches it.",
        markdown_table(["library", "compile the schema", "mask per token (mean / median / max)", "masks"], libraries),
        f"A decode step on the llama.cpp runtime ({args.threads} threads), 8 rows at temperature 0.8, median of "
        f"{args.rounds} rounds of {args.steps} steps each, taking turns:",
        markdown_table(["8 rows", "ms a step", "ratio", "target"], [
            ["free", f"{steps['free'] * 1e3:.2f}", "1.00×", ""],
            ["constrained (each its own matcher)", f"{steps['constrained'] * 1e3:.2f}", f"{ratio:.2f}×",
             f"≤ {STEP_TARGET}×: {'met' if ratio <= STEP_TARGET else 'NOT met'}"],
        ]),
        f"`client.chat.completions.parse(response_format=Person)`, temperature 0.8, max_tokens 200, {args.requests} "
        f"requests 8 at a time: {outcomes} ({valid / args.requests:.0%} valid; target 100 %: "
        f"{'met' if valid == args.requests else 'NOT met'}); completion tokens median "
        f"{np.median(parsed['tokens']) if parsed['tokens'] else float('nan'):.0f}, max "
        f"{max(parsed['tokens']) if parsed['tokens'] else 0}; {parsed['seconds']:.1f} s in all.",
    ])
    publish(section, write=not args.no_results)


if __name__ == "__main__":
    main()
