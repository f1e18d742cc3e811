"""The llama.cpp causal-LM runtime: the shipped GGUF as it is, every sequence in one KV cache.

llama.cpp (through llama-cpp-python's low-level API, :mod:`batchserve.runtimes.llama.native`)
holds one unified KV cache whose cells carry the sequences they belong to.  The runtime
maps the engine's sequence ids onto llama.cpp's sequence slots:

* ``0 .. max_sequences - 1``: the engine's sequences, one slot each (same number);
* the next :data:`SCRATCH_SLOTS`: one for :meth:`next_logits`, then :data:`PREFIX_SLOTS` and
  :data:`SCORE_SLOTS` for scoring (a scoring job may pause between its passes, holding them)
  (emptied before they return);
* the rest: the prefix cache's entries (:mod:`batchserve.runtimes.llama.prefix`).

Every engine step is one ``llama_decode`` over all live sequences; a fork shares the
cells of the forked sequence (``seq_cp``, no data copied); a released sequence's cells
move to a prefix-cache slot (or are freed), and a new prompt that begins with the tokens
of an entry shares those cells and runs only the rest.

The context holds :func:`context_tokens` cells: ``max(8192, 256 x max_sequences)`` for the
running sequences (one sequence may take a whole context of the model's, capped there),
plus the prefix cache's budget, plus :data:`SCORE_TOKENS` for scoring.  At 22.5 KiB a cell
(SmolLM2-135M, f16 K and V) the defaults (32 rows, 4096 cached tokens) hold 13.3 k cells,
300 MiB.  When a pass finds no free cell the prefix cache is emptied and the pass retried.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# imported with this module, in the thread that builds the apps, never first in a loading
# thread (two threads importing transformers' lazy names at once fail: see apps/llm.py)
from transformers import AutoTokenizer  # noqa: F401

from batchserve.errors import DeadlineExceededError
from batchserve.runtimes.base import CausalLM, prefix_groups
from batchserve.runtimes.llama.native import Context, KVCacheFullError, LlamaError, Model
from batchserve.runtimes.llama.prefix import PrefixCache

log = logging.getLogger("batchserve.generation")

#: most sequence slots llama.cpp allows (LLAMA_MAX_SEQ)
MAX_SLOTS = 256
#: scratch slots for scoring sequences side by side, each on a copy of its group's shared prefix
SCORE_SLOTS = 16
#: scratch slots holding shared prefixes (of several texts' candidates) at once while those run
PREFIX_SLOTS = 4
#: every scratch slot: next_logits's, the prefixes', the scored sequences'
SCRATCH_SLOTS = 1 + PREFIX_SLOTS + SCORE_SLOTS
#: KV cells set aside for scoring
SCORE_TOKENS = 1024
#: output rows (each a vocabulary of float32 logits) of one scoring pass, and its most tokens:
#: one ubatch (as fast a token as bigger passes), about 0.25 s on two cores, the longest a
#: scoring job holds the running batch up between two of its decode steps
SCORE_OUTPUTS = 63
#: KV cells per running sequence the context is sized for (at least one full context)
TOKENS_PER_SEQUENCE = 256
#: tokens of one llama_decode call (prefill is cut into passes of this many)
BATCH_TOKENS = 512
#: prefix-cache budget when none is given
DEFAULT_PREFIX_CACHE_TOKENS = 4096
#: fewest shared first tokens worth a copy
MIN_PREFIX_TOKENS = 4
#: text whose tokens the Hugging Face tokenizer and llama.cpp must agree on
TOKENIZER_PROBE = "Hello world! def f(x):\n    return 2 * x  # café, naïve 日本\n\n  end."


def context_tokens(max_sequences: int, model_context: int, prefix_cache_tokens: int) -> tuple[int, int]:
    """(KV cells of the context, cells for the running sequences): see the module's doc."""
    running = max(min(model_context, 8192), TOKENS_PER_SEQUENCE * max_sequences)
    total = running + max(prefix_cache_tokens, 0) + SCORE_TOKENS
    return -(-total // 256) * 256, running


class LlamaCausalLM(CausalLM):
    """A GGUF model run by llama.cpp on the CPU, sequences in slots of one unified KV cache."""

    name = "llama.cpp"
    pads_rows = False  # one llama_decode takes each row's own tokens, no padding

    def __init__(
        self,
        model: Model,
        context: Context,
        tokenizer,
        max_sequences: int,
        max_positions: int,
        prefix_cache: PrefixCache,
        model_name: str = "model",
        load_info: dict[str, Any] | None = None,
        threads: int = 1,
        max_kv_tokens: int | None = None,
    ):
        self.model = model
        self.context = context
        self._tokenizer = tokenizer
        self.max_sequences = max_sequences
        self._max_positions = max_positions
        self.max_kv_tokens = max_kv_tokens
        self.prefix_cache = prefix_cache
        self.model_name = model_name
        self.load_info = dict(load_info or {})
        self.threads = threads
        self.n_vocab = model.n_vocab
        self._stop_tokens = {token for token in (model.eos, tokenizer.eos_token_id) if isinstance(token, int) and token >= 0}
        self._next_slot = max_sequences
        self._prefix_slots = list(range(max_sequences + 1, max_sequences + 1 + PREFIX_SLOTS))
        self._score_slots = list(range(max_sequences + 1 + PREFIX_SLOTS, max_sequences + SCRATCH_SLOTS))
        self._tokens: dict[int, list[int]] = {}  # live sequence -> its tokens in the KV cache (positions 0..)

    @classmethod
    def load(
        cls,
        path: str | None = None,
        cache_dir: str | None = None,
        device: str = "cpu",
        max_sequences: int = 32,
        threads: int | None = None,
        prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS,
    ) -> "LlamaCausalLM":
        """``path``: a ``.gguf`` file (None: the bundled SmolLM2), run as it is (no conversion);
        ``threads``: llama.cpp's threads (None: this process's share of the cores,
        :func:`~batchserve.devices.process_threads`);
        ``prefix_cache_tokens``: the prefix cache's budget (0: no prefix cache)."""
        from batchserve.devices import process_threads
        from batchserve.runtimes.bundled import BUNDLED_NAME, bundled_gguf_path
        from batchserve.runtimes.llama.loading import load_gguf_tokenizer

        if device != "cpu":
            raise ValueError(f"the llama.cpp runtime runs on the CPU, not {device}: use the torch runtime there")
        if path is not None and not path.endswith(".gguf"):
            raise ValueError(f"the llama.cpp runtime runs .gguf files, not {path}: use the torch runtime for it")
        cache_slots = 0
        if prefix_cache_tokens > 0:
            cache_slots = min(max(max_sequences, 8), MAX_SLOTS - max_sequences - SCRATCH_SLOTS)
        if max_sequences < 1 or cache_slots < (1 if prefix_cache_tokens > 0 else 0):
            raise ValueError(
                f"the llama.cpp runtime runs 1 to {MAX_SLOTS - 1 - SCRATCH_SLOTS} sequences at once, not {max_sequences}"
            )
        gguf = Path(path) if path else bundled_gguf_path()
        threads = threads or process_threads()
        started = time.perf_counter()
        tokenizer = load_gguf_tokenizer(gguf, Path(cache_dir) if cache_dir else None)
        tokenizer_seconds = time.perf_counter() - started
        model = Model(str(gguf))
        try:
            _check_tokenizer(tokenizer, model, gguf)
            n_ctx, running = context_tokens(max_sequences, model.n_ctx_train, prefix_cache_tokens)
            n_seq_max = max_sequences + SCRATCH_SLOTS + cache_slots
            context = Context(model, n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=BATCH_TOKENS, threads=threads)
        except BaseException:
            model.close()
            raise
        first_cache_slot = max_sequences + SCRATCH_SLOTS
        prefix_cache = PrefixCache(
            list(range(first_cache_slot, first_cache_slot + cache_slots)), prefix_cache_tokens, MIN_PREFIX_TOKENS
        )
        info = {
            "path": str(gguf),
            "load_seconds": round(time.perf_counter() - started, 3),
            "tokenizer_seconds": round(tokenizer_seconds, 3),
            "context_tokens": context.n_ctx,
            "sequence_slots": context.n_seq_max,
        }
        name = BUNDLED_NAME if path is None else gguf.stem
        max_positions = min(model.n_ctx_train, running) if model.n_ctx_train > 0 else running
        return cls(model, context, tokenizer, max_sequences, max_positions, prefix_cache, name, info, threads, running)

    # ---------------------------------------------------------------- the model's facts

    @property
    def max_positions(self) -> int:
        return self._max_positions

    @property
    def stop_tokens(self) -> set[int]:
        return self._stop_tokens

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def live(self) -> list[int]:
        return list(self._tokens)

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "device": "cpu",
            "precision": self.model.description().split(" ", 2)[-1],  # "llama 256M Q4_1": the file's type
            "threads": self.threads,
            "prefix_cache_tokens": self.prefix_cache.budget,
        }

    def prefix_cache_stats(self) -> dict[str, int]:
        return self.prefix_cache.stats()

    def drop_prefix_cache(self) -> None:
        """Empty the prefix cache (its cells are freed)."""
        for slot in self.prefix_cache.evict_all():
            self.context.seq_rm(slot)

    # ---------------------------------------------------------------- sequences

    def prefill(self, seq_ids: list[int], prompts: list[list[int]]) -> torch.Tensor:
        if len(seq_ids) != len(prompts):
            raise ValueError("one prompt per sequence")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"sequences {seq_ids} repeat an id")
        for seq in seq_ids:
            self._check_new(seq)
        for ids in prompts:
            self._check_tokens(ids)
        try:
            logits = self._start(seq_ids, prompts)
        except BaseException:
            for seq in seq_ids:
                self.context.seq_rm(seq)
            raise
        for seq, ids in zip(seq_ids, prompts):
            self._tokens[seq] = list(ids)
        return torch.from_numpy(logits)

    def fork(self, seq_id: int, new_ids: list[int]) -> None:
        if seq_id not in self._tokens:
            raise KeyError(f"sequence {seq_id} is not live")
        if len(set(new_ids)) != len(new_ids):
            raise ValueError(f"sequences {new_ids} repeat an id")
        for seq in new_ids:
            self._check_new(seq)
        for seq in new_ids:
            self.context.seq_cp(seq_id, seq)
            self._tokens[seq] = list(self._tokens[seq_id])

    def decode(self, seq_ids: list[int], tokens: list[int]) -> torch.Tensor:
        if len(seq_ids) != len(self._tokens) or set(seq_ids) != set(self._tokens):
            raise ValueError("decode takes every live sequence, each once")
        if len(tokens) != len(seq_ids):
            raise ValueError("one token per sequence")
        self._check_tokens(tokens)
        for seq in seq_ids:
            if len(self._tokens[seq]) >= self._max_positions:
                raise ValueError(f"sequence {seq} is at the context's end ({self._max_positions} tokens)")
        positions = [len(self._tokens[seq]) for seq in seq_ids]
        rows = self._decode(tokens, positions, seq_ids, np.ones(len(seq_ids), dtype=np.int8))
        logits = self.context.logits(rows)
        for seq, token in zip(seq_ids, tokens):
            self._tokens[seq].append(token)
        return torch.from_numpy(logits)

    def release(self, seq_ids: list[int]) -> None:
        for seq in seq_ids:
            tokens = self._tokens.pop(seq, None)
            if tokens is None:
                continue
            admission = self.prefix_cache.admit(tokens)
            if admission is not None:
                for slot in admission.evict:
                    self.context.seq_rm(slot)
                self.context.seq_cp(seq, admission.slot, 0, admission.keep)
            self.context.seq_rm(seq)

    def clear(self) -> None:
        """Forget every sequence; the prefix cache keeps its entries (their cells are theirs alone)."""
        for seq in self._tokens:
            self.context.seq_rm(seq)
        self._tokens = {}
        self._clear_scratch()

    def _check_new(self, seq: int) -> None:
        if not 0 <= seq < self.max_sequences:
            raise ValueError(f"sequence ids go from 0 to {self.max_sequences - 1} (max_sequences), not {seq}")
        if seq in self._tokens:
            raise ValueError(f"sequence {seq} is live already")

    def _check_tokens(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("a prompt must have at least one token")
        if len(ids) > self._max_positions:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self._max_positions}")
        low, high = min(ids), max(ids)
        if low < 0 or high >= self.n_vocab:
            raise ValueError(f"token {high if high >= self.n_vocab else low} is not in the vocabulary (0 to {self.n_vocab - 1})")

    # ---------------------------------------------------------------- passes

    def _start(self, slots: list[int], prompts: list[list[int]]) -> np.ndarray:
        """Prefill ``prompts`` into empty ``slots`` (what the prefix cache holds of each is
        shared, the rest runs); the logits after each prompt's last token."""
        starts = []
        for slot, ids in zip(slots, prompts):
            found = self.prefix_cache.match(ids)
            start = 0
            if found is not None:
                entry, start = found
                self.context.seq_cp(entry, slot, 0, start)
            starts.append(start)
        tokens = np.concatenate([np.asarray(ids[start:], dtype=np.int32) for ids, start in zip(prompts, starts)])
        positions = np.concatenate([np.arange(start, len(ids), dtype=np.int32) for ids, start in zip(prompts, starts)])
        owners = np.concatenate([np.full(len(ids) - start, slot, dtype=np.int32) for slot, ids, start in zip(slots, prompts, starts)])
        outputs = np.zeros(len(tokens), dtype=np.int8)
        outputs[np.cumsum([len(ids) - start for ids, start in zip(prompts, starts)]) - 1] = 1
        results = []
        for begin in range(0, len(tokens), BATCH_TOKENS):
            end = begin + BATCH_TOKENS
            rows = self._decode(tokens[begin:end], positions[begin:end], owners[begin:end], outputs[begin:end])
            if rows:
                results.append(self.context.logits(rows))
        return np.concatenate(results)

    def _decode(self, tokens, positions, seq_ids, outputs) -> int:
        """One ``llama_decode``; when the KV cache is full, once more after emptying the prefix cache."""
        try:
            return self.context.decode(tokens, positions, seq_ids, outputs)
        except KVCacheFullError:
            entries = self.prefix_cache.stats()["entries"]
            if not entries:
                raise
            log.info("KV cache full: the prefix cache's %d entries are dropped", entries)
            self.drop_prefix_cache()
            return self.context.decode(tokens, positions, seq_ids, outputs)

    def _clear_scratch(self) -> None:
        for slot in (self._next_slot, *self._prefix_slots, *self._score_slots):
            self.context.seq_rm(slot)

    # ---------------------------------------------------------------- scoring

    def next_logits(self, ids: list[int]) -> torch.Tensor:
        self._check_tokens(ids)
        try:
            return torch.from_numpy(self._start([self._next_slot], [list(ids)])[0])
        finally:
            self.context.seq_rm(self._next_slot)

    def score_passes(self, sequences: list[list[int]], deadline: float | None = None):
        """Sequences in groups by their first tokens (:func:`~batchserve.runtimes.base.prefix_groups`);
        up to :data:`PREFIX_SLOTS` groups at a time: their shared prefixes run once each, on
        prefix slots (passes shared), then up to :data:`SCORE_SLOTS` members' remaining tokens
        side by side, each on a copy of its group's prefix (passes shared across groups).
        Passes of at most :data:`SCORE_OUTPUTS` output rows, the deadline checked before each."""
        for ids in sequences:
            self._check_tokens(ids)
        scores = [0.0] * len(sequences)
        try:
            for groups in _rounds(prefix_groups(sequences, MIN_PREFIX_TOKENS), PREFIX_SLOTS, SCORE_TOKENS // 2):
                yield from self._score_round(sequences, groups, deadline, scores)
        finally:  # also when the job is closed between two passes
            for slot in (*self._prefix_slots, *self._score_slots):
                self.context.seq_rm(slot)
        return scores

    def _score_round(
        self, sequences: list[list[int]], groups: list[tuple[int, list[int]]], deadline: float | None, scores: list[float]
    ) -> None:
        held = [(slot, shared, members) for slot, (shared, members) in zip(self._prefix_slots, groups) if shared]
        totals, lasts = yield from self._score_segments(
            [(slot, 0, sequences[members[0]][:shared]) for slot, shared, members in held], deadline, keep_last=True
        )
        after = {slot: (shared, total, last) for (slot, shared, _), total, last in zip(held, totals, lasts)}
        slot_of = {index: slot for slot, _, members in held for index in members}
        pending = [index for _, members in groups for index in members]
        for begin in range(0, len(pending), SCORE_SLOTS):
            wave = pending[begin : begin + SCORE_SLOTS]
            segments = []
            for scratch, index in zip(self._score_slots, wave):
                shared, _, _ = after.get(slot_of.get(index), (0, 0.0, None))
                rest = sequences[index][shared:]
                if shared and rest:
                    self.context.seq_cp(slot_of[index], scratch)
                segments.append((scratch, shared, rest))
            wave_totals, _ = yield from self._score_segments(segments, deadline, keep_last=False)
            for index, (scratch, _, rest), total in zip(wave, segments, wave_totals):
                _, prefix_total, last = after.get(slot_of.get(index), (0, 0.0, None))
                first = float(last[rest[0]]) if (last is not None and rest) else 0.0
                scores[index] = prefix_total + first + total
                self.context.seq_rm(scratch)
        for slot, _, _ in held:
            self.context.seq_rm(slot)

    def _score_segments(self, segments: list[tuple[int, int, list[int]]], deadline: float | None, keep_last: bool):
        """Run each ``(slot, first position, tokens)``, yielding after each pass; returns, per
        segment, the summed log-probability of each of its tokens after the first given the
        ones before, and (``keep_last``) the log-probabilities after its last token."""
        tokens, positions, owners, outputs, which, targets = [], [], [], [], [], []
        for index, (slot, start, ids) in enumerate(segments):
            for offset, token in enumerate(ids):
                tokens.append(token)
                positions.append(start + offset)
                owners.append(slot)
                scored = offset + 1 < len(ids)
                outputs.append(1 if scored or keep_last else 0)
                if scored or keep_last:
                    which.append(index)
                    targets.append(ids[offset + 1] if scored else -1)
        totals = [0.0] * len(segments)
        last: list[np.ndarray | None] = [None] * len(segments)
        begin, output_index = 0, 0
        while begin < len(tokens):
            end, rows = begin, 0
            while end < len(tokens) and end - begin < SCORE_OUTPUTS and rows + outputs[end] <= SCORE_OUTPUTS:
                rows += outputs[end]
                end += 1
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceededError("scoring did not finish before the request's deadline")
            count = self._decode(tokens[begin:end], positions[begin:end], owners[begin:end], outputs[begin:end])
            if count:
                logits = self.context.logits(count)
                logprobs_of = _log_softmax_rows(logits)
                for row in range(count):
                    index, target = which[output_index + row], targets[output_index + row]
                    if target >= 0:
                        totals[index] += float(logprobs_of(row, target))
                    else:
                        last[index] = logprobs_of(row, None)
                output_index += count
            begin = end
            yield  # a pass done: the engine may run a decode step before the next
        return totals, last

    def close(self) -> None:
        self.context.close()
        self.model.close()


def _log_softmax_rows(logits: np.ndarray):
    """A function (row, token) -> log p(token) of that row (token None: the whole row)."""
    peak = logits.max(axis=1, keepdims=True)
    normalizer = (np.log(np.exp(logits - peak, dtype=np.float64).sum(axis=1, keepdims=True)) + peak)[:, 0]

    def logprobs_of(row: int, token: int | None):
        if token is None:
            return (logits[row].astype(np.float64) - normalizer[row])
        return float(logits[row, token]) - normalizer[row]

    return logprobs_of


def _rounds(groups: list[tuple[int, list[int]]], most: int, tokens: int) -> list[list[tuple[int, list[int]]]]:
    """Consecutive groups, at most ``most`` and ``tokens`` shared tokens at a time (at least one group)."""
    rounds: list[list[tuple[int, list[int]]]] = []
    held = 0
    for group in groups:
        if not rounds or len(rounds[-1]) >= most or held + group[0] > tokens:
            rounds.append([])
            held = 0
        rounds[-1].append(group)
        held += group[0]
    return rounds


def _check_tokenizer(tokenizer, model: Model, gguf: Path) -> None:
    """The Hugging Face tokenizer must give llama.cpp's token ids (the engine tokenizes, llama.cpp runs)."""
    ours = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    theirs = model.tokenize(TOKENIZER_PROBE, add_special=False)
    if ours != theirs:
        raise LlamaError(f"the tokenizer built from {gguf.name} disagrees with llama.cpp's vocabulary: {ours[:8]} != {theirs[:8]}")
