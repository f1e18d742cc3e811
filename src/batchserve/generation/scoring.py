"""Scoring texts with the engine's causal LM (infill's candidates), through its runtime.

``text_logprobs`` and ``next_token_texts`` run in the engine thread between two steps
(``engine.call``; ``text_logprob_passes`` a pass at a time, decode steps between); the
runtime does the passes (:meth:`~batchserve.runtimes.base.CausalLM.score`:
prefixes shared, memory bounded, the deadline checked between passes).

:class:`ScoringQueue` merges the scoring of concurrent requests: while one call runs, the
texts of new requests wait; the next call scores every waiting request's texts together
(each distinct text once), so their passes and their shared prefixes are shared too.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Callable

from batchserve.errors import DeadlineExceededError
from batchserve.runtimes.base import CausalLM

if TYPE_CHECKING:
    from batchserve.generation.engine import GenerationEngine

#: texts one merged call takes at most (a request with more goes alone): a call holds the
#: engine between two decode steps, about 4 ms a token run on two CPU cores
MAX_CALL_TEXTS = 128


def text_logprobs(lm: CausalLM, texts: list[str], deadline: float | None = None) -> list[float]:
    """Sum of ``log p(token | tokens before it)`` over each text's tokens (its first token is given)."""
    return lm.score([lm.encode(text) for text in texts], deadline)


def text_logprob_passes(lm: CausalLM, texts: list[str], deadline: float | None = None):
    """:func:`text_logprobs` as an engine job: a pass at a time, decode steps between."""
    return lm.score_passes([lm.encode(text) for text in texts], deadline)


def next_token_texts(lm: CausalLM, text: str, k: int) -> list[str]:
    """The ``k`` most probable next tokens after ``text``, decoded."""
    logits = lm.next_logits(lm.encode(text))
    return [lm.tokenizer.decode([token]) for token in logits.topk(k).indices.tolist()]


class _Text:
    """A text to score, and the requests waiting for its score."""

    def __init__(self, future: asyncio.Future, deadline: float):
        self.future = future
        self.deadline = deadline  # the latest of its requests' deadlines
        self.waiters = 0


class ScoringQueue:
    """Scores texts for many concurrent requests in shared engine calls, one call at a time.

    Every distinct text is scored once for all the requests that want it while it waits or
    runs: a request whose texts the running call already scores waits for that call, and
    the rest of its texts wait, with every other request's, for the next call (up to
    ``max_texts`` texts, oldest first).  ``engine`` gives the engine to call (a NotReadyError
    while the model loads reaches the waiting requests).  A call runs until the latest
    deadline among its texts; a request whose caller goes away, or whose own deadline
    passes, stops waiting, and a waiting text nobody wants any more is not scored.
    """

    def __init__(self, engine: Callable[[], "GenerationEngine"], max_texts: int = MAX_CALL_TEXTS):
        self._engine = engine
        self.max_texts = max_texts
        self._waiting: dict[str, _Text] = {}  # insertion order: oldest first
        self._running: dict[str, _Text] = {}
        self._call: asyncio.Future | None = None
        self.calls = 0  # engine calls made, and the texts they scored
        self.texts = 0

    async def text_logprobs(self, texts: list[str], deadline: float) -> list[float]:
        """:func:`text_logprobs` of ``texts``, scored with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        entries: dict[str, _Text] = {}
        for text in texts:
            if text in entries:
                continue
            entry = self._running.get(text) or self._waiting.get(text)
            if entry is None:
                entry = self._waiting[text] = _Text(loop.create_future(), deadline)
            entry.deadline = max(entry.deadline, deadline)
            entry.waiters += 1
            entries[text] = entry
        self._launch()
        try:
            scores = {text: await asyncio.shield(entry.future) for text, entry in entries.items()}
        finally:
            for text, entry in entries.items():
                entry.waiters -= 1
                if not entry.waiters and self._waiting.get(text) is entry:
                    del self._waiting[text]
                    entry.future.cancel()
        return [scores[text] for text in texts]

    def _launch(self) -> None:
        if self._call is not None or not self._waiting:
            return
        now, taken = time.monotonic(), {}
        for text in list(self._waiting):
            entry = self._waiting[text]
            if entry.deadline <= now:
                del self._waiting[text]
                entry.future.set_exception(DeadlineExceededError("scoring did not start before the request's deadline"))
                entry.future.exception()  # retrieved (its waiters have their own deadline)
            elif len(taken) < self.max_texts:
                taken[text] = self._waiting.pop(text)
        if not taken:
            return
        try:
            engine = self._engine()
        except Exception as error:
            self._settle(taken, error=error)
            return
        self.calls += 1
        self.texts += len(taken)
        self._running = taken
        deadline = max(entry.deadline for entry in taken.values())
        self._call = asyncio.ensure_future(engine.call(text_logprob_passes, list(taken), deadline))
        self._call.add_done_callback(self._finish)

    def _finish(self, call: asyncio.Future) -> None:
        taken, self._running, self._call = self._running, {}, None
        if call.cancelled():
            self._settle(taken, error=RuntimeError("the scoring call was cancelled"))
        elif call.exception() is not None:
            self._settle(taken, error=call.exception())
        else:
            self._settle(taken, scores=call.result())
        self._launch()

    @staticmethod
    def _settle(taken: dict[str, _Text], scores: list[float] | None = None, error: BaseException | None = None) -> None:
        for index, entry in enumerate(taken.values()):
            if entry.future.done():
                continue
            if error is None:
                entry.future.set_result(scores[index])
            else:
                entry.future.set_exception(error)
                entry.future.exception()  # retrieved: a text whose waiters left has nobody to raise it to
