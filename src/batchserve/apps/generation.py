"""Text generation: OpenAI ``/v1/completions`` and ``/v1/chat/completions``, ``/autocomplete``
and the editor page at ``/``.

One causal LM (the bundled SmolLM2-135M-Instruct, or ``--generation-model``) runs behind a
continuous-batching :class:`~batchserve.generation.GenerationEngine`: every concurrent
request and each of its ``n`` alternatives is a row of the same running batch.  The model
and engine live in :mod:`batchserve.apps.llm`, shared with the infill app when both are served.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from batchserve.apps.base import Service, deadline_dependency
from batchserve.apps.chat import add_chat_route
from batchserve.apps.completions import add_completions_route
from batchserve.apps.llm import GenerationHost, GenerationService, cancel_on_disconnect, host_for
from batchserve.apps.openai import usage
from batchserve.generation import SamplingParams
from batchserve.settings import Settings

AUTOCOMPLETE_CONTEXT_TOKENS = 1024  # the editor's context is cut to its last tokens


# --------------------------------------------------------------------------- autocomplete


class AutocompleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo is a 422, not a default silently used

    context: str = Field(min_length=1, description="the text before the cursor")
    n: int = Field(3, ge=1, le=8, description="how many alternative suggestions")
    max_tokens: int = Field(12, ge=1, le=128)
    temperature: float = Field(0.8, ge=0, le=2)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int | None = None
    stop: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=lambda: ["\n\n"], max_length=4)


def build_router(host: GenerationHost, settings: Settings) -> APIRouter:
    router = APIRouter(tags=["generation"])
    request_timeout = deadline_dependency(settings)
    add_completions_route(router, host, request_timeout)
    add_chat_route(router, host, request_timeout)

    @router.post("/autocomplete", summary="n alternative continuations of the text before the cursor")
    async def autocomplete(body: AutocompleteRequest, request: Request, timeout: float = Depends(request_timeout)):
        engine = host.running_engine()
        context_ids = engine.encode(body.context)[-AUTOCOMPLETE_CONTEXT_TOKENS:]
        params = SamplingParams(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            seed=body.seed,
            stop=tuple(body.stop),
        )
        generation = engine.submit(context_ids, params, n=body.n, timeout=timeout, streamed=False)
        completion = await cancel_on_disconnect(request, [generation], generation.result())
        return {
            "suggestions": [choice.text for choice in completion.choices],
            "usage": usage(completion.prompt_tokens, completion.completion_tokens),
        }

    add_editor_routes(router)
    return router


# --------------------------------------------------------------------------- editor page

EDITOR_FILES = {"editor.js": "text/javascript", "editor.css": "text/css"}


def _web_file(name: str) -> str:
    return (resources.files("batchserve") / "web" / name).read_text(encoding="utf-8")


def add_editor_routes(router: APIRouter) -> None:
    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def editor_page():
        return HTMLResponse(_web_file("editor.html"))

    @router.get("/editor/{name}", include_in_schema=False)
    async def editor_asset(name: str):
        if name not in EDITOR_FILES:
            return Response(status_code=404)
        return Response(_web_file(name), media_type=EDITOR_FILES[name], headers={"Cache-Control": "no-cache"})


def build(settings: Settings) -> Service:
    host = host_for(settings)
    return GenerationService("generation", build_router(host, settings), host)
