"""Turning a growing list of token ids into text that is safe to stream.

Two things are held back until they are certain: an incomplete UTF-8 character (a token
may carry half of one; it decodes to U+FFFD) and a tail that could still become a stop
string.  A stop string ends the choice and is never part of its text.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Decodes only a small window of recent tokens per step, whatever the length so far."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window that is decoded again each step
        self.read_offset = 0  # tokens before this have been turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add a token; return the new text it completes (may be empty)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :]


class StopMatcher:
    """Finds stop strings across token boundaries and holds back a possible partial match."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(stop for stop in stops if stop)
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of ``text`` already released

    def push(self, delta: str) -> tuple[str, bool]:
        """Add decoded text; return ``(text safe to release, stopped)``."""
        self.text += delta
        hit = self._first_stop()
        if hit is not None:
            released = self.text[self.sent : hit]
            self.text = self.text[:hit]
            self.sent = hit
            return released, True
        safe_end = len(self.text) - self._partial_tail()
        released = self.text[self.sent : safe_end]
        self.sent = max(self.sent, safe_end)
        return released, False

    def flush(self) -> str:
        """Release the held-back tail: the choice ended without completing a stop string."""
        released = self.text[self.sent :]
        self.sent = len(self.text)
        return released

    def _first_stop(self) -> int | None:
        starts = [self.text.find(stop, self.sent) for stop in self.stops]
        found = [start for start in starts if start >= 0]
        return min(found) if found else None

    def _partial_tail(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of a stop string."""
        longest = 0
        unreleased = len(self.text) - self.sent
        for stop in self.stops:
            for size in range(min(len(stop) - 1, unreleased), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
