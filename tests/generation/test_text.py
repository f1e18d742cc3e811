"""ChoiceText, one row's text as its tokens come: stop tokens and stop strings end it (never
in its text), max_tokens ends it with "length", text is streamed as it becomes certain, and a
request that is not streamed gets one delta with everything."""

from __future__ import annotations

from batchserve.generation.sampling import SamplingParams
from batchserve.generation.text import ChoiceText

EOS = 0
#: token id -> its text; 5 and 6 are the two halves of one UTF-8 character ("é")
PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: b"\xc3", 6: b"\xa9", 7: "EN", 8: "D!", 9: "\n"}


class Tokenizer:
    """Decodes ids by joining their pieces as bytes (an incomplete character becomes U+FFFD)."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        pieces = [PIECES[i] for i in ids if i != EOS]
        data = b"".join(piece if isinstance(piece, bytes) else piece.encode() for piece in pieces)
        return data.decode("utf-8", errors="replace")


def run(tokens, streamed=True, **params):
    text = ChoiceText(3, Tokenizer(), SamplingParams(**params), stop_tokens={EOS}, streamed=streamed)
    deltas = [delta for delta in map(text.add, tokens) if delta is not None]
    return text, deltas


def test_text_streams_as_it_becomes_certain_and_a_stop_token_ends_it():
    text, deltas = run([1, 2, 5, 6, 3, EOS], max_tokens=16)
    assert [(d.text, d.finish_reason) for d in deltas] == [("Hel", None), ("lo", None), ("é", None), (" wor", None), ("", "stop")]
    assert [d.token_ids for d in deltas] == [[1], [2], [5, 6], [3], [EOS]]  # the half character waited
    assert deltas[-1].tokens == 6 and deltas[0].index == 3
    assert text.finish_reason == "stop"


def test_a_stop_string_across_tokens_ends_the_choice_and_is_not_in_its_text():
    text, deltas = run([1, 7, 8], max_tokens=16, stop=["END"])
    assert "".join(d.text for d in deltas) == "Hel"
    assert deltas[-1].finish_reason == "stop" and text.finish_reason == "stop"
    assert deltas[-1].token_ids == [7, 8]  # "EN" was held back: it might have been the stop string


def test_a_partial_stop_string_is_released_when_the_choice_ends_otherwise():
    _, deltas = run([1, 7], max_tokens=2, stop=["END"])
    assert "".join(d.text for d in deltas) == "HelEN"
    assert deltas[-1].finish_reason == "length"


def test_max_tokens_ends_the_choice_with_length_and_flushes_what_was_held():
    _, deltas = run([1, 5], max_tokens=2)
    assert [(d.text, d.finish_reason) for d in deltas] == [("Hel", None), ("\ufffd", "length")]


def test_ignore_eos_generates_through_a_stop_token():
    text, deltas = run([1, EOS, 2], max_tokens=3, ignore_eos=True)
    assert "".join(d.text for d in deltas) == "Hello"
    assert text.finish_reason == "length"


def test_a_request_not_streamed_gets_one_delta_with_everything():
    text, deltas = run([1, 2, 3, 4, 9, EOS], streamed=False, max_tokens=16)
    assert len(deltas) == 1
    assert (deltas[0].text, deltas[0].finish_reason, deltas[0].tokens) == ("Hello world\n", "stop", 6)
    assert deltas[0].token_ids == [1, 2, 3, 4, 9, EOS]
    assert text.held == []
