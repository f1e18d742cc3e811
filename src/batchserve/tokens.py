"""A served model's vocabulary as clients see it: token ids, and what each token is as bytes.

:class:`Vocabulary` wraps a Hugging Face ``tokenizers.Tokenizer`` (a fast tokenizer's
``backend_tokenizer``): ``encode`` / ``decode`` for ``/tokenize`` and ``/detokenize``, and
:meth:`Vocabulary.token_bytes`, the bytes a token adds to the text, for the pieces of
``/tokenize`` and the ``bytes`` of OpenAI's logprobs.  A token's bytes depend on how the
tokenizer writes its vocabulary (read from its decoder):

* byte-level BPE (GPT-2, SmolLM2, Llama 3): each byte is one printable character
  (:func:`byte_level_alphabet`), mapped back;
* SentencePiece style (Llama 2, Mistral): ``▁`` is a space, ``<0x0A>`` a raw byte;
* WordPiece (BERT, all-MiniLM): ``##ing`` continues a word (``ing``), other tokens are as written;
* added and special tokens (``<|im_end|>``, ``[CLS]``): their text.

Anything else falls back on decoding the token alone.  Built once per vocabulary, on first use.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

#: a SentencePiece vocabulary's space
METASPACE = "\u2581"


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable character for each byte, inverted (character → byte): the
    printable Latin-1 bytes stand for themselves, the others for characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[chr(byte)] = byte
        else:
            characters[chr(256 + extra)] = byte
            extra += 1
    return characters


def decoder_kinds(config: Any) -> set[str]:
    """Every decoder ``type`` in a tokenizer's ``decoder`` configuration (sequences included)."""
    kinds: set[str] = set()
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("type"), str):
                kinds.add(item["type"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return kinds


class Vocabulary:
    """Tokenizing for clients, over a ``tokenizers.Tokenizer``; thread-safe."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._bytes: list[bytes] | None = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, tokenizer: Any) -> "Vocabulary | None":
        """The vocabulary of a Hugging Face fast tokenizer, or of a ``tokenizers.Tokenizer``;
        None for a tokenizer without one (a slow, Python-only tokenizer)."""
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        return cls(backend) if hasattr(backend, "encode_batch") else None

    @property
    def size(self) -> int:
        """Token ids are 0 to ``size - 1`` (added tokens included)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special``: with the special tokens the model's tokenizer
        adds around a text (BOS, ``[CLS]``...), as the model is fed."""
        return self.tokenizer.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens written out (the inverse of :meth:`encode`)."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    @property
    def has_bytes(self) -> bool:
        """Whether the table of tokens' bytes is built (building it takes a vocabulary's pass)."""
        return self._bytes is not None

    def token_bytes(self, token: int) -> bytes:
        """The bytes ``token`` adds to a text (part of a UTF-8 character, for some)."""
        table = self._bytes
        if table is None:
            with self._lock:
                if self._bytes is None:
                    self._bytes = self._table()
                table = self._bytes
        return table[token]

    def piece(self, token: int) -> str | list[int]:
        """As llama.cpp's server writes a token's piece: its text, or its bytes when they are
        not whole UTF-8 characters."""
        data = self.token_bytes(token)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return list(data)

    def _table(self) -> list[bytes]:
        tokenizer = self.tokenizer
        kinds = decoder_kinds(json.loads(tokenizer.to_str()).get("decoder"))
        added = {token_id: added.content for token_id, added in tokenizer.get_added_tokens_decoder().items()}
        alphabet = byte_level_alphabet()
        table = []
        for token_id in range(self.size):
            if token_id in added:
                table.append(added[token_id].encode("utf-8"))
                continue
            text = tokenizer.id_to_token(token_id)
            if text is None:  # a hole in the ids
                table.append(b"")
            elif "ByteLevel" in kinds and all(character in alphabet for character in text):
                table.append(bytes(alphabet[character] for character in text))
            elif "ByteFallback" in kinds and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                table.append(bytes([int(text[3:5], 16)]))
            elif "Metaspace" in kinds or "ByteFallback" in kinds:
                table.append(text.replace(METASPACE, " ").encode("utf-8"))
            elif "WordPiece" in kinds:
                table.append((text[2:] if text.startswith("##") else text).encode("utf-8"))
            else:
                table.append(tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8"))
        return table
