"""OpenAI's two ``logprobs`` shapes, from the engine's :class:`~batchserve.generation.TokenLogprob`.

* chat (:func:`chat_logprobs`): ``{"content": [{"token", "logprob", "bytes", "top_logprobs":
  [{"token", "logprob", "bytes"}]}], "refusal": null}``;
* completions, the legacy shape (:class:`LegacyLogprobs`): ``{"tokens", "token_logprobs",
  "top_logprobs": [{token: logprob}], "text_offset"}``, offsets in characters of the choice's
  text (after the prompt, with ``echo``), carried from chunk to chunk of a stream.

A token's string is its text, or ``bytes:\\xNN...`` when its bytes are not whole UTF-8
characters (as OpenAI writes them); ``bytes`` is always the list of its bytes.  The values
are log-probabilities under the model's distribution at that step (before temperature,
top-k and top-p: :func:`batchserve.generation.sampling.token_logprobs`).
"""

from __future__ import annotations

import codecs
from typing import Any

from batchserve.generation import TokenLogprob
from batchserve.tokens import Vocabulary


def token_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


def chat_logprobs(entries: list[TokenLogprob], vocabulary: Vocabulary) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        data = vocabulary.token_bytes(token)
        return {"token": token_text(data), "logprob": logprob, "bytes": list(data)}

    content = [
        {**item(entry.token, entry.logprob), "top_logprobs": [item(token, logprob) for token, logprob in entry.top]}
        for entry in entries
    ]
    return {"content": content, "refusal": None}


class LegacyLogprobs:
    """The legacy ``logprobs`` of one choice, a piece at a time (a stream's chunks, or all at once)."""

    def __init__(self, vocabulary: Vocabulary, offset: int = 0):
        self.vocabulary = vocabulary
        self.offset = offset  # characters of the choice's text before the next token
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        tokens, offsets = [], []
        for entry in entries:
            data = self.vocabulary.token_bytes(entry.token)
            tokens.append(token_text(data))
            offsets.append(self.offset)
            self.offset += len(self.decoder.decode(data))
        top = [{token_text(self.vocabulary.token_bytes(token)): logprob for token, logprob in entry.top} for entry in entries]
        return {
            "tokens": tokens,
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": top,
            "text_offset": offsets,
        }
