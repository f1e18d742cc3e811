"""One generation request as both sides see it: the engine thread fills it, asyncio reads it.

The engine pushes :class:`ChoiceDelta` events (thread-safe, through the caller's event
loop); the caller iterates them (streaming) or waits for all of them (:meth:`result`).
Cancelling frees the request's rows at the engine's next step.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from batchserve.errors import BatchserveError, DeadlineExceededError
from batchserve.generation.sampling import SamplingParams, TokenLogprob

_ids = itertools.count()


@dataclass
class ChoiceDelta:
    """New text of one choice; ``finish_reason`` is set on its last delta (``stop`` / ``length``)."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0  # tokens generated for this choice so far
    token_ids: list[int] = field(default_factory=list)  # tokens generated since the previous delta
    #: with ``params.logprobs``: those tokens' log-probabilities (a stop token that ends the choice has none)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str
    tokens: int
    token_ids: list[int]  # every generated token, including any that completed a stop string
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with ``params.logprobs``: as token_ids, less a stop token


@dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(choice.tokens for choice in self.choices)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    #: False: the caller awaits ``result()``, so each choice's text comes in one event when it
    #: finishes (no wakeup of the event loop per token, whose work would stall the model's threads)
    streamed: bool = True
    admitted_step: int | None = None  # the engine step at which the request joined the batch
    submitted: float = field(default_factory=time.monotonic)  # for the engine's time to first token
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    constraint: Any = None  # a CompiledConstraint: each choice's tokens kept to it
    offline: bool = False  # submitted inside priority.offline(): waits for rows behind online requests

    @property
    def kv_tokens(self) -> int:
        """KV-cache slots the request may need at most: every row holds prompt + max_tokens."""
        return self.n * (len(self.prompt_ids) + self.params.max_tokens)

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    # ---- engine thread side

    def emit(self, event: ChoiceDelta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    # ---- asyncio side

    def cancel(self) -> None:
        self.cancelled = True

    async def stream(self):
        """Yield :class:`ChoiceDelta` events until every choice has finished."""
        open_choices = self.n
        try:
            while open_choices:
                remaining = self.deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(self.events.get(), timeout=max(remaining, 0))
                except asyncio.TimeoutError:
                    raise DeadlineExceededError("generation did not finish before the request's deadline") from None
                if isinstance(event, BaseException):
                    raise event
                if event.finish_reason is not None:
                    open_choices -= 1
                yield event
        finally:
            if open_choices:
                self.cancel()

    async def result(self) -> Completion:
        texts = [[] for _ in range(self.n)]
        token_ids = [[] for _ in range(self.n)]
        logprobs = [[] for _ in range(self.n)]
        finished: dict[int, ChoiceDelta] = {}
        async for event in self.stream():
            texts[event.index].append(event.text)
            token_ids[event.index].extend(event.token_ids)
            logprobs[event.index].extend(event.logprobs)
            if event.finish_reason is not None:
                finished[event.index] = event
        choices = [
            Choice(
                index, "".join(texts[index]), finished[index].finish_reason, finished[index].tokens, token_ids[index],
                logprobs[index],
            )
            for index in range(self.n)
        ]
        return Completion(choices, len(self.prompt_ids))


def error_for(error: BaseException) -> BaseException:
    """What the caller sees for an engine failure: our own errors as they are, others wrapped."""
    from batchserve.errors import ModelError

    if isinstance(error, BatchserveError):
        return error
    return ModelError(f"generation failed: {type(error).__name__}: {error}")
