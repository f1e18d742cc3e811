"""``POST /tokenize`` and ``POST /detokenize``, in llama.cpp's server shape, for every served
model with a vocabulary (the generation model, the embeddings model).

* ``/tokenize`` ``{"content": TEXT, "add_special": false, "with_pieces": false}`` →
  ``{"tokens": [ids]}``, or with ``with_pieces`` ``{"tokens": [{"id": ID, "piece": TEXT}]}``
  (a piece that is not whole UTF-8 characters is its list of bytes, as llama.cpp writes it).
  ``add_special`` adds the special tokens the model's tokenizer puts around a text (BOS,
  ``[CLS]``/``[SEP]``): with it the count is what the completions route counts for a prompt.
  No truncation: every token of the text.
* ``/detokenize`` ``{"tokens": [ids]}`` → ``{"content": TEXT}``, special tokens written out.

Both take an optional ``model`` (llama.cpp's server has one model; this one may serve two):
absent, the one model served; with several, a 422 asks for it.  The vocabularies are read
from the services at request time (the generation model's is there once it is loaded).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from batchserve.apps.base import Service
from batchserve.errors import InputError, ModelNotFoundError, NotReadyError
from batchserve.tokens import Vocabulary

#: a text longer than this (characters) is tokenized in a thread, off the event loop
THREAD_ABOVE = 8192


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(description="the text to tokenize")
    add_special: bool = Field(False, description="add the special tokens the model's tokenizer puts around a text (BOS, [CLS])")
    with_pieces: bool = Field(False, description="each token as {id, piece}: its text, or its bytes when not whole UTF-8")
    model: str | None = Field(None, description="the model whose vocabulary (absent: the one served)")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[int] = Field(description="token ids")
    model: str | None = Field(None, description="the model whose vocabulary (absent: the one served)")


def check_unicode(text: str) -> None:
    """A 422 for a text JSON can carry but no tokenizer can read: a lone surrogate (``\\ud800``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(
            f"content is not valid Unicode: a lone surrogate at character {error.start}", param="content"
        ) from None


def build_router(services: list[Service]) -> APIRouter:
    router = APIRouter(tags=["tokenize"])

    def vocabulary(model: str | None) -> tuple[str, Vocabulary]:
        served: dict[str, Vocabulary] = {}
        for service in services:
            for name, found in service.vocabularies().items():
                served.setdefault(name, found)  # the generation and infill apps share one model
        if model is not None:
            if model not in served:
                names = ", ".join(served) or "none yet"
                raise ModelNotFoundError(f"the model {model!r} is not served here (served: {names})")
            return model, served[model]
        if not served:
            raise NotReadyError("the model is loading")
        if len(served) > 1:
            raise InputError(f"this server serves several models ({', '.join(served)}): name one in 'model'", param="model")
        return next(iter(served.items()))

    @router.post("/tokenize", summary="Token ids of a text (llama.cpp server's shape)")
    async def tokenize(body: TokenizeRequest):
        _, found = vocabulary(body.model)
        check_unicode(body.content)
        if len(body.content) > THREAD_ABOVE:
            ids = await asyncio.to_thread(found.encode, body.content, body.add_special)
        else:
            ids = found.encode(body.content, body.add_special)
        if not body.with_pieces:
            return {"tokens": ids}
        if not found.has_bytes:  # built once, off the event loop
            await asyncio.to_thread(found.token_bytes, 0)
        return {"tokens": [{"id": token, "piece": found.piece(token)} for token in ids]}

    @router.post("/detokenize", summary="The text of token ids (llama.cpp server's shape)")
    async def detokenize(body: DetokenizeRequest):
        name, found = vocabulary(body.model)
        size = found.size
        for position, token in enumerate(body.tokens):
            if not 0 <= token < size:
                raise InputError(
                    f"tokens[{position}]: {token} is not a token id of {name} (0 to {size - 1})", param="tokens"
                )
        if len(body.tokens) > THREAD_ABOVE:
            return {"content": await asyncio.to_thread(found.decode, body.tokens)}
        return {"content": found.decode(body.tokens)}

    return router
