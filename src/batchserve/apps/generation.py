"""Text generation: OpenAI ``/v1/completions``, ``/autocomplete`` and the editor page at ``/``.

One causal LM (the bundled SmolLM2-135M-Instruct, or ``--generation-model``) runs behind a
continuous-batching :class:`~batchserve.generation.GenerationEngine`: every concurrent
request and each of its ``n`` alternatives is a row of the same running batch.  The
infill app shares the same engine when both are served.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from batchserve.apps.base import Service, deadline_dependency
from batchserve.errors import NotReadyError
from batchserve.generation import EngineLimits, GenerationEngine, GenerationRequest, SamplingParams, load_causal_lm
from batchserve.server.settings import Settings

log = logging.getLogger("batchserve.generation")

AUTOCOMPLETE_CONTEXT_TOKENS = 1024  # the editor's context is cut to its last tokens


class GenerationRuntime:
    """The loaded model and its engine, shared by every app of this process that generates."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine: GenerationEngine | None = None
        self.load_info: dict[str, Any] = {}
        self._loading: asyncio.Future | None = None
        self._users = 0
        self.collector = GenerationCollector(self)

    async def start(self) -> None:
        self._users += 1
        if self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))
        await asyncio.shield(self._loading)

    def _load(self) -> None:
        if self.settings.generation_threads:
            import torch

            torch.set_num_threads(self.settings.generation_threads)  # process-wide: every torch model here
        loaded = load_causal_lm(self.settings.generation_model, self.settings.generation_cache_dir, device=_device())
        limits = EngineLimits(max_rows=self.settings.generation_max_rows, max_waiting_rows=self.settings.max_queue_size)
        engine = GenerationEngine(loaded.model, loaded.tokenizer, limits, name=loaded.name)
        engine.start()
        self.load_info = {
            "path": loaded.path,
            "load_seconds": round(loaded.load_seconds, 3),
            "dequantize_seconds": None if loaded.converted_seconds is None else round(loaded.converted_seconds, 3),
        }
        log.info("generation model %s loaded in %.2f s", loaded.name, loaded.load_seconds)
        self.engine = engine

    async def close(self) -> None:
        self._users -= 1
        if self._users <= 0 and self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.stop)

    def ready(self) -> bool:
        return self.engine is not None

    def running_engine(self) -> GenerationEngine:
        if self.engine is None:
            raise NotReadyError("the generation model is loading")
        return self.engine

    def describe(self) -> dict[str, Any]:
        engine = self.engine.describe() if self.engine is not None else {}
        return {**engine, **self.load_info}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_runtimes: dict[tuple, GenerationRuntime] = {}


def runtime_for(settings: Settings) -> GenerationRuntime:
    """One runtime per model in a process, whichever apps ask for it."""
    key = (settings.generation_model, settings.generation_cache_dir, settings.generation_max_rows)
    if key not in _runtimes:
        _runtimes[key] = GenerationRuntime(settings)
    return _runtimes[key]


class GenerationCollector:
    """Prometheus figures of the generation engine, read at scrape time."""

    def __init__(self, runtime: "GenerationRuntime"):
        self.runtime = runtime

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engine = self.runtime.engine
        figures = engine.describe() if engine is not None else {}
        rows = GaugeMetricFamily("batchserve_generation_active_rows", "Sequences in the running batch")
        waiting = GaugeMetricFamily("batchserve_generation_waiting_requests", "Requests waiting for rows")
        steps = CounterMetricFamily("batchserve_generation_steps", "Engine steps (prefill and/or decode)")
        tokens = CounterMetricFamily("batchserve_generation_tokens", "Tokens generated")
        rows.add_metric([], figures.get("active_rows", 0))
        waiting.add_metric([], figures.get("waiting_requests", 0))
        steps.add_metric([], figures.get("steps", 0))
        tokens.add_metric([], figures.get("tokens_generated", 0))
        yield from (rows, waiting, steps, tokens)


class GenerationService(Service):
    """A service whose engine is a :class:`GenerationRuntime` rather than batchers."""

    def __init__(self, name: str, router: APIRouter, runtime: GenerationRuntime):
        super().__init__(name, router)
        self.runtime = runtime
        self.collectors = [runtime.collector]  # the same object for every service of one runtime

    async def start(self) -> None:
        await self.runtime.start()

    async def close(self, grace: float = 0.0) -> None:
        await self.runtime.close()

    def ready(self) -> bool:
        return self.error is None and self.runtime.ready()

    def describe(self) -> dict[str, Any]:
        return {"ready": self.ready(), "error": self.error, "engine": self.runtime.describe()}


async def cancel_on_disconnect(request: Request, generations: list[GenerationRequest], work):
    """Await ``work``; if the HTTP client goes away first, cancel the generations (free their rows)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            for generation in generations:
                generation.cancel()
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


# --------------------------------------------------------------------------- autocomplete


class AutocompleteRequest(BaseModel):
    context: str = Field(min_length=1, description="the text before the cursor")
    n: int = Field(3, ge=1, le=8, description="how many alternative suggestions")
    max_tokens: int = Field(12, ge=1, le=128)
    temperature: float = Field(0.8, ge=0, le=2)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int | None = None
    stop: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=lambda: ["\n\n"], max_length=4)


def build_router(runtime: GenerationRuntime, settings: Settings) -> APIRouter:
    from batchserve.apps.openai_completions import add_completions_route

    router = APIRouter(tags=["generation"])
    request_timeout = deadline_dependency(settings)
    add_completions_route(router, runtime, request_timeout)

    @router.post("/autocomplete", summary="n alternative continuations of the text before the cursor")
    async def autocomplete(body: AutocompleteRequest, request: Request, timeout: float = Depends(request_timeout)):
        engine = runtime.running_engine()
        context_ids = engine.encode(body.context)[-AUTOCOMPLETE_CONTEXT_TOKENS:]
        params = SamplingParams(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            seed=body.seed,
            stop=tuple(body.stop),
        )
        generation = engine.submit(context_ids, params, n=body.n, timeout=timeout)
        completion = await cancel_on_disconnect(request, [generation], generation.result())
        return {
            "suggestions": [choice.text for choice in completion.choices],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
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
    runtime = runtime_for(settings)
    return GenerationService("generation", build_router(runtime, settings), runtime)
