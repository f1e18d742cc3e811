"""What every app that generates text shares: one loaded causal LM and its engine.

The generation (``/autocomplete``, the editor), completions (``/v1/completions``) and infill
(``/infill``) apps of one process all run on one :class:`GenerationHost`: one causal-LM
runtime (:data:`batchserve.runtimes.LANGUAGE_MODELS`, one copy of the model), one
continuous-batching :class:`~batchserve.generation.GenerationEngine` driving it, every
request a row of the same running batch.  Each app is a :class:`GenerationService`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, TypeVar

from fastapi import APIRouter, Request

from batchserve.apps.base import Service
from batchserve.devices import pick_torch_device
from batchserve.errors import ClientDisconnectedError, NotReadyError
from batchserve.generation import EngineLimits, GenerationEngine, GenerationRequest
from batchserve.runtimes import CausalLM, language_model_class
from batchserve.settings import GenerationSettings, LanguageModelRuntimeName, Settings
from batchserve.tokens import Vocabulary

log = logging.getLogger("batchserve.generation")

T = TypeVar("T")

#: seconds between two checks whether the HTTP client is still there
DISCONNECT_POLL = 0.25


def runtime_name(generation: GenerationSettings, device: str) -> str:
    """The causal-LM runtime to build (a name in ``batchserve.runtimes.LANGUAGE_MODELS``): the
    one set, or for ``auto`` llama.cpp on a CPU for a GGUF model (the bundled one included)
    when llama-cpp-python loads, else torch."""
    chosen = generation.generation_runtime
    if chosen is not LanguageModelRuntimeName.auto:
        return chosen.value
    gguf = generation.generation_model is None or generation.generation_model.endswith(".gguf")
    if device == "cpu" and gguf and _llama_cpp_loads():
        return LanguageModelRuntimeName.llama_cpp.value
    return LanguageModelRuntimeName.torch.value


def _llama_cpp_loads() -> bool:
    try:
        import llama_cpp  # noqa: F401  (its shared library loads at import)
    except Exception as error:  # not installed, or built for another machine
        log.info("llama-cpp-python does not load (%s): the generation runtime is torch", error)
        return False
    return True


class GenerationHost:
    """The loaded model and its engine, shared by every app of this process that generates.

    Each service using it calls :meth:`start` and :meth:`close`; the model loads at the
    first start and its engine stops at the last close, after which a start loads it anew
    (a test client, or a server started twice in one process, starts the same apps again).
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = pick_torch_device()
        # resolved (its module imported: torch, transformers) here, in the thread that builds the
        # apps: importing transformers in the loading thread while another service's loading
        # thread imports it too fails ("cannot import name 'AutoTokenizer'")
        self.runtime = language_model_class(runtime_name(settings.generation, self.device))
        self.lm: CausalLM | None = None
        self.engine: GenerationEngine | None = None
        self.vocabulary: Vocabulary | None = None  # of the loaded model (None for a slow tokenizer)
        self.load_info: dict[str, Any] = {}
        self.collector = GenerationCollector(self)
        self.key = host_key(settings)
        self._loading: asyncio.Task | None = None
        self._users = 0

    async def start(self) -> None:
        self._users += 1
        _hosts.setdefault(self.key, self)  # in use again after a close: the one apps built now share
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load_and_keep())
        await asyncio.shield(self._loading)

    async def _load_and_keep(self) -> None:
        lm, engine, vocabulary = await asyncio.to_thread(self._load)
        if self._loading is not asyncio.current_task():  # closed while it loaded: nobody is left to use it
            await asyncio.to_thread(engine.stop)
            return
        self.lm = lm
        self.vocabulary = vocabulary
        self.load_info = {**lm.describe(), **lm.load_info}
        self.engine = engine

    def _load(self) -> tuple[CausalLM, GenerationEngine, Vocabulary | None]:
        generation = self.settings.generation
        limits = EngineLimits(max_rows=generation.generation_max_rows, max_waiting_rows=self.settings.batching.max_queue_size)
        lm = self.runtime.load(
            generation.generation_model,
            generation.generation_cache_dir,
            device=self.device,
            max_sequences=limits.max_rows,
            threads=generation.generation_threads,
            prefix_cache_tokens=generation.generation_prefix_cache_tokens,
        )
        if lm.max_kv_tokens:  # a KV cache of a fixed size: admit no more than it holds (503 past it)
            limits.max_kv_tokens = min(limits.max_kv_tokens, lm.max_kv_tokens)
        vocabulary = Vocabulary.of(lm.tokenizer)
        if vocabulary is not None:  # its tokens' bytes (logprobs, pieces), built now rather than at a first request
            vocabulary.token_bytes(0)
        engine = GenerationEngine(lm, limits)
        engine.start()
        log.info("generation model %s loaded by the %s runtime in %.2f s", lm.model_name, lm.name, lm.load_info.get("load_seconds", 0.0))
        return lm, engine, vocabulary

    async def close(self) -> None:
        """One user fewer; at the last, stop the engine and forget the model (a later start loads it)."""
        self._users -= 1
        if self._users > 0:
            return
        self._users = 0
        if _hosts.get(self.key) is self:
            del _hosts[self.key]
        self._loading = None  # a load still under way stops its engine when it ends
        engine, self.engine = self.engine, None
        self.lm, self.load_info, self.vocabulary = None, {}, None
        if engine is not None:
            await asyncio.to_thread(engine.stop)

    def ready(self) -> bool:
        return self.engine is not None

    def running_engine(self) -> GenerationEngine:
        if self.engine is None:
            raise NotReadyError("the generation model is loading")
        return self.engine

    @property
    def model_name(self) -> str | None:
        return self.engine.name if self.engine is not None else None

    def prefix_cache_stats(self) -> dict[str, int] | None:
        return self.lm.prefix_cache_stats() if self.lm is not None else None

    def describe(self) -> dict[str, Any]:
        engine = self.engine.describe() if self.engine is not None else {}
        cache = self.prefix_cache_stats()
        return {**engine, **self.load_info, **({"prefix_cache": cache} if cache is not None else {})}


#: the hosts of this process that apps share, by their generation settings: a host is here from
#: when an app is built on it until its last user closes (and again when it starts again)
_hosts: dict[tuple, GenerationHost] = {}


def host_key(settings: Settings) -> tuple:
    return tuple(settings.generation.model_dump().items())


def host_for(settings: Settings) -> GenerationHost:
    """One host per model in a process, whichever apps ask for it."""
    key = host_key(settings)
    if key not in _hosts:
        _hosts[key] = GenerationHost(settings)
    return _hosts[key]


#: the prefix cache's counters in /metrics (``batchserve_generation_prefix_cache_<key>_total``)
PREFIX_CACHE_COUNTERS = {
    "hits": "Prompts that began with tokens the prefix cache held",
    "misses": "Prompts the prefix cache had nothing for",
    "reused_tokens": "Prompt tokens taken from the prefix cache instead of being run",
    "evictions": "Prefix-cache entries dropped for room",
}


class GenerationCollector:
    """Prometheus figures of the generation engine, read at scrape time."""

    def __init__(self, host: GenerationHost):
        self.host = host

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        engine = self.host.engine
        figures = engine.describe() if engine is not None else {}
        rows = GaugeMetricFamily("batchserve_generation_active_rows", "Sequences in the running batch")
        waiting = GaugeMetricFamily("batchserve_generation_waiting_requests", "Requests waiting for rows")
        steps = CounterMetricFamily("batchserve_generation_steps", "Engine steps (prefill and/or decode)")
        tokens = CounterMetricFamily("batchserve_generation_tokens", "Tokens generated")
        first = SummaryMetricFamily(
            "batchserve_generation_first_token_seconds", "Time from a request's arrival to its first tokens"
        )
        rows.add_metric([], figures.get("active_rows", 0))
        waiting.add_metric([], figures.get("waiting_requests", 0))
        steps.add_metric([], figures.get("steps", 0))
        tokens.add_metric([], figures.get("tokens_generated", 0))
        first.add_metric([], figures.get("first_tokens", 0), figures.get("first_token_seconds", 0.0))
        yield from (rows, waiting, steps, tokens, first)
        cache = self.host.prefix_cache_stats() or {}
        for key, help_text in PREFIX_CACHE_COUNTERS.items():
            counter = CounterMetricFamily(f"batchserve_generation_prefix_cache_{key}", help_text)
            counter.add_metric([], cache.get(key, 0))
            yield counter
        held = GaugeMetricFamily("batchserve_generation_prefix_cache_tokens", "Tokens the prefix cache holds")
        held.add_metric([], cache.get("tokens", 0))
        yield held


class GenerationService(Service):
    """A service whose engine is a :class:`GenerationHost` rather than batchers."""

    def __init__(self, name: str, router: APIRouter, host: GenerationHost):
        super().__init__(name, router, collectors=[host.collector])  # one collector object per host
        self.host = host

    @property
    def pads_rows(self) -> bool:  # type: ignore[override]
        """The runtime's own (llama.cpp: no; torch: left-padded rows)."""
        return self.host.runtime.pads_rows

    @property
    def models(self) -> list[str]:
        name = self.host.model_name
        return [name] if name else []

    @property
    def tokenizes(self) -> bool:
        return True

    def vocabularies(self) -> dict[str, Vocabulary]:
        name, vocabulary = self.host.model_name, self.host.vocabulary
        return {name: vocabulary} if name and vocabulary is not None else {}

    async def start(self) -> None:
        await self.host.start()

    async def close(self, grace: float = 0.0) -> None:
        await self.host.close()

    def ready(self) -> bool:
        return self.error is None and self.host.ready()

    def describe(self) -> dict[str, Any]:
        return {"ready": self.ready(), "error": self.error, "engine": self.host.describe()}


async def cancel_on_disconnect(request: Request, generations: list[GenerationRequest], work: Awaitable[T]) -> T:
    """Await ``work``; if the HTTP client goes away first, cancel the generations (their rows
    are freed at the engine's next step) and raise :class:`ClientDisconnectedError`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        gone = not task.done()  # a task just cancelled is not done yet: never ask it for a result
        if gone:
            task.cancel()
            task.add_done_callback(_retrieve)
            for generation in generations:
                generation.cancel()
    if gone or task.cancelled():
        raise ClientDisconnectedError("the client went away before its generation finished")
    return task.result()


def _retrieve(task: asyncio.Future) -> None:
    """Take the outcome of abandoned work, so asyncio logs no 'exception was never retrieved'."""
    if not task.cancelled():
        task.exception()


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL)
