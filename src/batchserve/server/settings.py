"""Server settings: one object built by the CLI, passed to the app factory.

They travel to gunicorn workers as JSON in the ``BATCHSERVE_SETTINGS`` variable.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

SETTINGS_ENV = "BATCHSERVE_SETTINGS"


class Settings(BaseModel):
    apps: list[str] = Field(default_factory=lambda: ["embeddings"])
    models: list[str] = Field(default_factory=list, description="user models, [name=]module:attr")
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = Field(64, ge=1)
    max_latency: float = Field(0.01, ge=0)
    max_queue_size: int = Field(1024, ge=1)
    timeout: float = Field(30.0, gt=0, description="default per-request deadline, seconds")
    max_timeout: float = Field(600.0, gt=0, description="largest deadline a client may ask for")
    max_body_bytes: int = Field(1_000_000, ge=1)
    backend: str = "thread"
    workers: int = Field(1, ge=1, description="worker processes per model (process backend)")
    devices: list[str] = Field(default_factory=lambda: ["cpu"], description="cpu or cuda:N, round-robin")
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads; default cores // workers")
    max_batches_per_worker: int | None = Field(None, ge=1, description="recycle a worker after this many batches")
    http_workers: int = Field(1, ge=1, description="HTTP processes; more than 1 runs gunicorn")
    redis_url: str | None = Field(None, description="redis backend: redis://[:password@]host:port/db or rediss://")
    redis_prefix: str = Field("", description="redis backend: keeps several deployments apart on one Redis")
    drain_seconds: float = Field(1.0, ge=0, description="after SIGTERM: seconds /readyz is 503 before closing")
    grace: float = Field(30.0, ge=0, description="after closing: seconds in-flight requests may take")
    generation_model: str | None = Field(None, description="generation: a causal-LM directory or .gguf; default the bundled SmolLM2")
    generation_cache_dir: str | None = Field(None, description="generation: where the GGUF is dequantized to safetensors")
    generation_max_rows: int = Field(32, ge=1, description="generation: sequences decoding together")
    generation_threads: int | None = Field(None, ge=1, description="generation: torch threads of this process")
    docs: bool = True
    metrics: bool = True
    log_level: str = "warning"

    def to_env(self) -> None:
        os.environ[SETTINGS_ENV] = self.model_dump_json()

    @classmethod
    def from_env(cls) -> "Settings":
        raw = os.environ.get(SETTINGS_ENV)
        return cls.model_validate_json(raw) if raw else cls()
