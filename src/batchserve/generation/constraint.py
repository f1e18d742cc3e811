"""Constrained decoding: a row's tokens kept to a JSON schema, a regular expression or a grammar.

A request may carry a :class:`Constraint` (OpenAI's ``response_format`` ``json_object`` /
``json_schema``, or batchserve's ``regex`` and ``grammar`` extensions).  :class:`Constraints`
(one per engine) checks and compiles it once per request with llguidance, so an unsupported
schema feature is the request's 422 before it queues; each row of the request (each of its
``n`` choices) gets its own matcher (:meth:`CompiledConstraint.matcher`).  At every step the
engine asks each constrained row's matcher for the tokens allowed next, sets the others'
logits to ``-inf`` in that row only (:func:`mask_rows`), samples, and tells the matcher the
token drawn: constrained and free rows share every decode step.

llguidance was chosen over xgrammar and outlines-core by measuring the three on SmolLM2's
49,152-token vocabulary (docs/generation.md): it compiles a schema in milliseconds (the
others spend a third of a second per new schema building an index) and computes a mask in
a fraction of a millisecond per token; it reads JSON schemas, regular expressions and Lark
grammars (GBNF converts), and names what it does not support.

A matcher allows the end-of-sequence token only where the constraint is complete, so a
constrained choice ends ``stop`` on a complete value, or ``length`` at ``max_tokens`` (cut short).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchserve.errors import InputError
from batchserve.extras import needs_extra

FEATURE = "constrained decoding (response_format)"

#: the kinds of constraint: OpenAI's two JSON modes and batchserve's extensions
KINDS = ("json_object", "json_schema", "regex", "grammar", "gbnf")


@dataclass(frozen=True)
class Constraint:
    """What a request's text must match: ``kind`` (one of :data:`KINDS`) and its ``source`` (a
    JSON schema as JSON text, a regular expression, a Lark or GBNF grammar; empty for ``json_object``)."""

    kind: str
    source: str = ""


class CompiledConstraint:
    """A checked grammar; :meth:`matcher` starts one row's matcher on it."""

    def __init__(self, grammar: str, tokenizer: Any):
        self.grammar = grammar
        self.tokenizer = tokenizer

    def matcher(self) -> Any:
        import llguidance

        return llguidance.LLMatcher(self.tokenizer, self.grammar)


class Constraints:
    """Compiles constraints for one model's vocabulary (llguidance's tokenizer, built once, on
    first use: about a second for a 49k vocabulary); thread-safe."""

    def __init__(self, hf_tokenizer: Any, stop_tokens: set[int]):
        self.hf_tokenizer = hf_tokenizer
        self.stop_tokens = sorted(stop_tokens)  # what a complete value may end with
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                with needs_extra("generation", FEATURE):
                    import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, eos_token=self.stop_tokens)
            return self._tokenizer

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        """The constraint checked against this vocabulary; an :class:`InputError` naming what is
        wrong or unsupported (``Unimplemented keys: ["uniqueItems"]``, a look-ahead in a regex...)."""
        with needs_extra("generation", FEATURE):
            import llguidance

        grammar = grammar_of(constraint, llguidance.LLMatcher)
        tokenizer = self.tokenizer()
        problem = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if problem:
            raise InputError(f"the {constraint.kind} is not supported: {problem.strip()}", param="response_format")
        return CompiledConstraint(grammar, tokenizer)

    def mask(self, logits: np.ndarray, rows: list[int], matchers: list[Any]) -> None:
        """:func:`mask_rows` with this vocabulary."""
        mask_rows(logits, rows, matchers, self.tokenizer().vocab_size, self.stop_tokens[0])


#: JSON written compactly, one space after ``,`` and ``:`` (``json.dumps``'s default): with
#: whitespace free, a small model may write blank lines until ``max_tokens``; a schema's
#: ``x-guidance`` object may say otherwise
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_of(constraint: Constraint, matcher_class: Any) -> str:
    if constraint.kind == "json_object":
        return matcher_class.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=JSON_LAYOUT)
    if constraint.kind == "json_schema":
        return matcher_class.grammar_from_json_schema(constraint.source, defaults=JSON_LAYOUT)
    if constraint.kind == "regex":
        return matcher_class.grammar_from_regex(constraint.source)
    if constraint.kind == "grammar":
        return matcher_class.grammar_from_lark(constraint.source)
    if constraint.kind == "gbnf":
        import llguidance

        try:
            lark = llguidance.gbnf_to_lark(constraint.source)
        except Exception as error:  # its parse error, as the client's 422
            raise InputError(f"the GBNF grammar does not parse: {error}", param="response_format") from None
        return matcher_class.grammar_from_lark(lark)
    raise InputError(f"unknown constraint kind {constraint.kind!r}: one of {', '.join(KINDS)}", param="response_format")


def mask_rows(logits: np.ndarray, rows: list[int], matchers: list[Any], size: int, fallback: int) -> None:
    """Set to ``-inf``, in each of ``rows`` of ``logits`` ``[rows, width]`` (float32, in place),
    the logits of the tokens its matcher does not allow next (tokens past the tokenizer's
    ``size``, in a wider output layer, never are).  A matcher that allows nothing (it
    failed) gets ``fallback`` (an end-of-sequence token): its row ends."""
    import llguidance.numpy

    bitmask = llguidance.numpy.allocate_token_bitmask(len(rows), size)
    for index, matcher in enumerate(matchers):
        llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, index)
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").astype(bool)
    width = logits.shape[1]
    if allowed.shape[1] < width:
        allowed = np.pad(allowed, ((0, 0), (0, width - allowed.shape[1])))
    allowed = allowed[:, :width]
    for index, row in enumerate(rows):
        if not allowed[index].any():
            allowed[index, fallback] = True
        logits[row, ~allowed[index]] = -np.inf
