"""Every setting of batchserve, in one place: defaults, bounds and help.

The settings are grouped by the layer that reads them: :class:`BatchingSettings` (the
batcher), :class:`ProcessSettings` (the process backend), :class:`RedisSettings` (the Redis
backend and workers), :class:`EmbeddingsSettings` (the embeddings app's runtime),
:class:`GenerationSettings` (the generation engine),
:class:`ServerSettings` (HTTP).  :class:`Settings` holds one of each plus what is served.

The command line builds its options from these fields (:func:`batchserve.cli.option`), so
a default or a help text is written here and nowhere else.  Field names are unique across
the groups: ``Settings.from_options(max_batch_size=8, port=9000)`` routes each to its group.
Settings travel to gunicorn workers as JSON in ``BATCHSERVE_SETTINGS``.
"""

from __future__ import annotations

import enum
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SETTINGS_ENV = "BATCHSERVE_SETTINGS"


class BackendKind(str, enum.Enum):
    """Where batches run (see :mod:`batchserve.backends`)."""

    thread = "thread"
    process = "process"
    redis = "redis"


class AppName(str, enum.Enum):
    """Built-in applications (see :mod:`batchserve.apps`); ``all`` serves every one."""

    embeddings = "embeddings"
    generation = "generation"
    infill = "infill"
    all = "all"


class EncoderRuntimeName(str, enum.Enum):
    """What runs the embeddings model (see :mod:`batchserve.runtimes`); ``auto``: onnx on a CPU, torch on a GPU."""

    auto = "auto"
    onnx = "onnx"
    torch = "torch"


class LanguageModelRuntimeName(str, enum.Enum):
    """What runs the generation model (see :mod:`batchserve.runtimes`); ``auto``: llama.cpp on a
    CPU for a GGUF model when llama-cpp-python loads, torch otherwise (and always on a GPU)."""

    auto = "auto"
    llama_cpp = "llama.cpp"
    torch = "torch"


class Quantization(str, enum.Enum):
    """Weights of the embeddings model: as trained, or int8 (onnx only, behind a quality gate)."""

    none = "none"
    int8 = "int8"


class LogLevel(str, enum.Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False)


class BatchingSettings(_Group):
    max_batch_size: int = Field(64, ge=1, description="most items in one batch")
#: the shortest deadline a client may ask for with X-Request-Timeout, seconds: below a
#: millisecond no request could be served in time (one batching wait is longer), so asking
#: for one is the client's mistake (422 naming the bounds), not a deadline passed (504)
MIN_REQUEST_TIMEOUT = 0.001


    max_latency: float = Field(0.01, ge=0, description="longest batching wait, seconds from the oldest queued item")
    max_queue_size: int = Field(
        1024, ge=1, description="queued items past which requests get 503 (one request of more items: 422)"
    )
    max_batch_tokens: int | None = Field(
        None, ge=1,
        description="token budget of one pass (rows x longest), for models that declare batch_length (default: the model's own)",
    )
    timeout: float = Field(30.0, gt=0, description="default per-request deadline, seconds")
    max_timeout: float = Field(
        600.0, ge=MIN_REQUEST_TIMEOUT,
        description=f"largest deadline a client may ask for (X-Request-Timeout: {MIN_REQUEST_TIMEOUT:g} s and up)",
    )


class ProcessSettings(_Group):
    workers: int = Field(1, ge=1, description="process backend: worker processes per model")
    devices: list[str] = Field(
        default_factory=lambda: ["cpu"], description="process backend: cpu, or cuda:0,cuda:1 (round-robin over workers)"
    )
    threads_per_worker: int | None = Field(
        None, ge=1, description="process backend: torch threads per CPU worker (default: cores // workers)"
    )
    max_batches_per_worker: int | None = Field(
        None, ge=1, description="process backend: recycle a worker after this many batches (default: never)"
    )


class RedisSettings(_Group):
    redis_url: str | None = Field(None, description="redis backend: redis://[:password@]host:port/db or rediss://")
    redis_prefix: str = Field("", description="redis backend: key prefix keeping deployments apart, the same on fronts and workers")
    visibility_timeout: float = Field(10.0, ge=0.1, description="worker: seconds before a dead worker's requests are taken over")


class EmbeddingsSettings(_Group):
    runtime: EncoderRuntimeName = Field(
        EncoderRuntimeName.auto, description="embeddings: auto (onnx on a CPU, torch on a GPU), onnx or torch"
    )
    quantize: Quantization = Field(
        Quantization.none,
        description="embeddings: none, or int8 weights (onnx runtime; refused at load unless cosine vs fp32 >= 0.99 mean, 0.98 min)",
    )


class GenerationSettings(_Group):
    generation_model: str | None = Field(
        None, description="generation/infill: a causal-LM directory or .gguf file (default: the bundled SmolLM2)"
    )
    generation_cache_dir: str | None = Field(
        None, description="where converted models are cached (default: $BATCHSERVE_CACHE_DIR or ~/.cache/batchserve)"
    )
    generation_max_rows: int = Field(32, ge=1, description="generation: sequences decoding together")
    generation_threads: int | None = Field(
        None, ge=1,
        description="generation: threads of the runtime (default: torch's, one per core; llama.cpp: the cores this process may use)",
    )
    generation_runtime: LanguageModelRuntimeName = Field(
        LanguageModelRuntimeName.auto,
        description="generation/infill: auto (llama.cpp on a CPU for a .gguf model when llama-cpp-python loads, else torch), "
        "llama.cpp or torch",
    )
    generation_prefix_cache_tokens: int = Field(
        4096, ge=0,
        description="generation, llama.cpp runtime: tokens of finished sequences kept so that prompts beginning with them "
        "reuse their KV cache (LRU; 0: no prefix cache)",
    )


class ServerSettings(_Group):
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes it to the network")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    max_body_bytes: int = Field(1_000_000, ge=1, description="larger request bodies get 413")
    http_workers: int = Field(1, ge=1, description="HTTP processes; more than 1 runs gunicorn (deploy/gunicorn.conf.py)")
    drain_seconds: float = Field(1.0, ge=0, description="on SIGTERM: seconds /readyz answers 503 before closing")
    grace: float = Field(30.0, ge=0, description="on shutdown: seconds in-flight requests may take")
    docs: bool = Field(True, description="serve /docs and /openapi.json")
    metrics: bool = Field(True, description="serve /metrics and /dashboard")
    log_level: LogLevel = Field(LogLevel.warning, description="debug, info, warning or error")


GROUPS: dict[str, type[_Group]] = {
    "batching": BatchingSettings,
    "process": ProcessSettings,
    "redis": RedisSettings,
    "embeddings": EmbeddingsSettings,
    "generation": GenerationSettings,
    "server": ServerSettings,
}


class Settings(_Group):
    """What to serve, and every group of settings."""

    apps: list[AppName] = Field(default_factory=list, description="built-in apps (embeddings when nothing else is given)")
    models: list[str] = Field(default_factory=list, description="your model as [name=]module:attr; repeatable")
    backend: BackendKind | None = Field(
        None,
        description="where batches run: thread, process or redis (default auto: for the embeddings on a CPU with 2+ "
        "cores and one HTTP process, process with one worker per core; else thread)",
    )
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    process: ProcessSettings = Field(default_factory=ProcessSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    embeddings: EmbeddingsSettings = Field(default_factory=EmbeddingsSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)

    @property
    def app_names(self) -> list[AppName]:
        """The apps to build: every one for ``all``; embeddings when neither apps nor models are given."""
        if AppName.all in self.apps:
            return [name for name in AppName if name is not AppName.all]
        if not self.apps and not self.models:
            return [AppName.embeddings]
        return list(dict.fromkeys(self.apps))

    @classmethod
    def from_options(cls, **options: Any) -> "Settings":
        """Settings from flat option names (the CLI's); None or an empty list means "the default"."""
        grouped: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        top: dict[str, Any] = {}
        for name, value in options.items():
            if value is None or (isinstance(value, (list, tuple)) and not value):
                continue
            group = group_of(name)
            (grouped[group] if group else top)[name] = list(value) if isinstance(value, tuple) else value
        return cls(**top, **{group: GROUPS[group](**values) for group, values in grouped.items()})

    def to_env(self) -> None:
        os.environ[SETTINGS_ENV] = self.model_dump_json()

    @classmethod
    def from_env(cls) -> "Settings":
        raw = os.environ.get(SETTINGS_ENV)
        return cls.model_validate_json(raw) if raw else cls()


def group_of(name: str) -> str | None:
    """The group holding the field ``name`` (None for the top-level fields of :class:`Settings`)."""
    for group, model in GROUPS.items():
        if name in model.model_fields:
            return group
    if name in Settings.model_fields and name not in GROUPS:
        return None
    raise ValueError(f"unknown setting {name!r}")


def field_info(name: str):
    """The pydantic field of setting ``name``, wherever it lives."""
    group = group_of(name)
    model = GROUPS[group] if group else Settings
    return model.model_fields[name]
