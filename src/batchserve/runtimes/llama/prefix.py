"""The prefix cache's bookkeeping: which token sequences the llama runtime keeps, in which slots.

When a sequence is released, its tokens (the ones whose KV the cache holds: the prompt
and every token fed back) may stay in the KV cache under a spare sequence slot; a later
prompt that begins with the same tokens has that part copied (llama.cpp's ``seq_cp`` over
a range of positions, which shares the cells rather than copying data) and runs only the
rest.  The editor re-sends its whole growing document at every Tab, chat re-sends the
conversation: most of such a prompt is found here.

:class:`PrefixCache` only decides: lookups (the longest common prefix over the entries),
admissions (an LRU over a token budget and a fixed set of slots) and the counters.  The
runtime applies its decisions to the KV cache: the slots an admission evicts are to be
emptied (``seq_rm``) before the released sequence is copied into the slot it is given.

The budget counts each entry's tokens (entries may share cells, so the cells held are at
most that): memory stays bounded, and decode steps, whose attention spans the used cells,
stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Entry:
    slot: int
    tokens: np.ndarray  # int32
    last_used: int = 0


@dataclass
class Admission:
    """Where a released sequence goes: its first ``keep`` tokens into ``slot``, once the
    ``evict`` slots are emptied."""

    slot: int
    keep: int
    evict: list[int] = field(default_factory=list)


class PrefixCache:
    """Token sequences kept in ``slots``, at most ``budget`` tokens in all."""

    def __init__(self, slots: list[int], budget: int, min_tokens: int = 4):
        self.slots = list(slots)
        self.budget = budget if slots else 0
        self.min_tokens = max(1, min_tokens)
        self._entries: dict[int, Entry] = {}  # slot -> entry
        self._tokens = 0  # over every entry (kept as a count: stats() may be read from another thread)
        self._clock = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    @property
    def tokens(self) -> int:
        """Tokens held over every entry."""
        return self._tokens

    def entries(self) -> list[tuple[int, list[int]]]:
        """(slot, tokens) of each entry, least recently used first."""
        ordered = sorted(self._entries.values(), key=lambda entry: entry.last_used)
        return [(entry.slot, entry.tokens.tolist()) for entry in ordered]

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "reused_tokens": self.reused_tokens,
            "evictions": self.evictions,
            "entries": len(self._entries),
            "tokens": self.tokens,
            "budget_tokens": self.budget,
        }

    # ---------------------------------------------------------------- lookups

    def match(self, prompt: list[int]) -> tuple[int, int] | None:
        """The entry sharing the longest first tokens with ``prompt``: ``(slot, tokens
        shared)``, at most ``len(prompt) - 1`` (the last token runs, for its logits);
        None (a miss) when no entry shares ``min_tokens``.  Counts the hit or miss."""
        if not self.enabled:
            return None
        wanted = np.asarray(prompt[:-1], dtype=np.int32)
        best: tuple[int, int] | None = None
        for entry in self._entries.values():
            shared = _common_length(entry.tokens, wanted)
            if shared >= self.min_tokens and (best is None or shared > best[1]):
                best = (entry.slot, shared)
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self.reused_tokens += best[1]
        self._touch(self._entries[best[0]])
        return best

    # ---------------------------------------------------------------- admissions

    def admit(self, tokens: list[int]) -> Admission | None:
        """Keep ``tokens`` (those of a sequence being released)?  None: not worth a slot
        (too short, or an entry already begins with all of them: that one is refreshed)."""
        if not self.enabled or len(tokens) < self.min_tokens:
            return None
        keep = min(len(tokens), self.budget)
        kept = np.asarray(tokens[:keep], dtype=np.int32)
        evict: list[int] = []
        for entry in list(self._entries.values()):
            shared = _common_length(entry.tokens, kept)
            if shared == keep:  # the new tokens are a prefix of this entry: nothing to add
                self._touch(entry)
                return None
            if shared == len(entry.tokens):  # this entry is a prefix of the new tokens: superseded
                evict.append(self._remove(entry.slot))
        while self._entries and (self.tokens + keep > self.budget or len(self._entries) >= len(self.slots)):
            oldest = min(self._entries.values(), key=lambda entry: entry.last_used)
            evict.append(self._remove(oldest.slot))
            self.evictions += 1
        used = set(self._entries)
        slot = next(slot for slot in self.slots if slot not in used)
        entry = Entry(slot, kept)
        self._entries[slot] = entry
        self._tokens += keep
        self._touch(entry)
        return Admission(slot, keep, evict)

    def evict_all(self) -> list[int]:
        """Forget every entry; the slots to empty."""
        slots = list(self._entries)
        self.evictions += len(slots)
        self._entries.clear()
        self._tokens = 0
        return slots

    def _remove(self, slot: int) -> int:
        self._tokens -= len(self._entries.pop(slot).tokens)
        return slot

    def _touch(self, entry: Entry) -> None:
        self._clock += 1
        entry.last_used = self._clock


def _common_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many first tokens ``a`` and ``b`` share."""
    length = min(len(a), len(b))
    if length == 0:
        return 0
    different = np.flatnonzero(a[:length] != b[:length])
    return int(different[0]) if len(different) else length
