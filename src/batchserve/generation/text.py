"""The text of one choice (one row of the running batch), as the engine draws its tokens.

:class:`ChoiceText` takes a row's tokens one at a time and decides, per row, what the
engine sends: the new text (incomplete UTF-8 and a possible partial stop string held back,
:mod:`~batchserve.generation.detokenize`), whether the choice ended and why (``stop``: a
stop token or a stop string, which is never part of the text; ``length``: ``max_tokens``
reached), and when to send it: at every token that adds text for a streamed request, once
at the end (one delta with all of it) for a request that only awaits its result.
"""

from __future__ import annotations

from batchserve.generation.detokenize import IncrementalDecoder, StopMatcher
from batchserve.generation.request import ChoiceDelta
from batchserve.generation.sampling import SamplingParams, TokenLogprob


class ChoiceText:
    """Text, stop and finish handling of one choice; :meth:`add` each token it generates."""

    def __init__(self, choice: int, tokenizer, params: SamplingParams, stop_tokens, streamed: bool = True):
        self.choice = choice
        self.params = params
        self.stop_tokens = stop_tokens
        self.streamed = streamed
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopMatcher(params.stop)
        self.tokens: list[int] = []  # generated so far
        self.reported = 0  # tokens already sent in a delta
        self.logprobs: list[TokenLogprob] = []  # of the tokens generated (with params.logprobs), a stop token's left out
        self.reported_logprobs = 0
        self.held: list[str] = []  # text not sent yet (a request not streamed)
        self.finish_reason: str | None = None

    def add(self, token: int, logprob: TokenLogprob | None = None) -> ChoiceDelta | None:
        """Take the next generated token (and its log-probability, when asked for); the delta to send now, if any."""
        self.tokens.append(token)
        text, reason = self._text_of(token)
        if logprob is not None and not (reason == "stop" and token in self.stop_tokens and not self.params.ignore_eos):
            self.logprobs.append(logprob)
        self.finish_reason = reason
        if reason is None and not self.streamed:
            self.held.append(text)  # sent with the last token
            return None
        if not (text or reason):
            return None
        if self.held:
            text, self.held = "".join(self.held) + text, []
        new_tokens, self.reported = self.tokens[self.reported :], len(self.tokens)
        new_logprobs, self.reported_logprobs = self.logprobs[self.reported_logprobs :], len(self.logprobs)
        return ChoiceDelta(self.choice, text, reason, len(self.tokens), new_tokens, new_logprobs)

    def _text_of(self, token: int) -> tuple[str, str | None]:
        """The text ``token`` releases, and the finish reason if it ends the choice."""
        if token in self.stop_tokens and not self.params.ignore_eos:
            released, stopped = self.stops.push(self.decoder.flush())
            return (released if stopped else released + self.stops.flush()), "stop"
        released, stopped = self.stops.push(self.decoder.push(token))
        if stopped:
            return released, "stop"
        if len(self.tokens) < self.params.max_tokens:
            return released, None
        tail, stopped = self.stops.push(self.decoder.flush())
        return released + (tail if stopped else tail + self.stops.flush()), ("stop" if stopped else "length")
