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

A config file (:mod:`batchserve.config`) is another way in, not a second schema:
:meth:`Settings.from_mapping` reads the same names, flat or in their groups, every problem
reported by its path (:class:`SettingsError`).  One model's or app's own batching and layout,
:class:`ModelSettings`, is made of the fields named in :data:`PER_MODEL`, taken from the
groups with their types, bounds and help; :meth:`Settings.for_model` lays a model's own
settings over the server-wide ones.
"""

from __future__ import annotations

import difflib
import enum
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Annotated, Any, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

SETTINGS_ENV = "BATCHSERVE_SETTINGS"
#: API keys from the environment, separated by spaces (``serve`` and gunicorn by hand read it)
API_KEY_ENV = "BATCHSERVE_API_KEY"


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


#: the shortest deadline a client may ask for with X-Request-Timeout, seconds: below a
#: millisecond no request could be served in time (one batching wait is longer), so asking
#: for one is the client's mistake (422 naming the bounds), not a deadline passed (504)
MIN_REQUEST_TIMEOUT = 0.001


class BatchingSettings(_Group):
    max_batch_size: int = Field(64, ge=1, description="most items in one batch")
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
        600.0, gt=0,
        description=f"largest deadline a client may ask for (X-Request-Timeout: {MIN_REQUEST_TIMEOUT:g} s and up)",
    )


class ProcessSettings(_Group):
    workers: int = Field(1, ge=1, description="process backend: worker processes per model")
    devices: list[str] = Field(
        default_factory=lambda: ["cpu"], description="process backend: cpu, or cuda:0,cuda:1 (round-robin over workers)"
    )
    threads_per_worker: int | None = Field(
        None, ge=1,
        description="threads of each process that computes, every runtime (torch, ONNX Runtime, llama.cpp): each CPU "
        "worker, or each HTTP process running its models itself (default: cores // (HTTP processes x workers))",
    )
    max_batches_per_worker: int | None = Field(
        None, ge=1, description="process backend: recycle a worker after this many batches (default: never)"
    )


class RedisSettings(_Group):
    redis_url: str | None = Field(
        None, description="redis backend: redis://[user:password@]host:port/db, or rediss:// for TLS"
    )
    redis_prefix: str = Field("", description="redis backend: key prefix keeping deployments apart, the same on fronts and workers")
    redis_ca_file: str | None = Field(
        None, description="redis backend: CA certificate (PEM) that signed a rediss:// server's certificate (default: the system's)"
    )
    redis_certfile: str | None = Field(
        None, description="redis backend: client certificate (PEM), for a Redis that asks for one (tls-auth-clients)"
    )
    redis_keyfile: str | None = Field(
        None, description="redis backend: the client certificate's private key (PEM; default: in --redis-certfile)"
    )
    visibility_timeout: float = Field(10.0, ge=0.1, description="worker: seconds before a dead worker's requests are taken over")
    wait_for_workers: bool = Field(
        False,
        description="redis backend: while no worker is up, queue each batch in the request stream until its deadline "
        "(a worker started later, scaled from zero, answers it) instead of answering 503",
    )


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
        description="generation: threads of the runtime (default: this process's share of the cores, "
        "cores // HTTP processes)",
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
    # a refused value is never echoed (pydantic would print it): it may be an API key
    model_config = ConfigDict(extra="forbid", use_enum_values=False, hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes it to the network")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    max_body_bytes: int = Field(1_000_000, ge=1, description="larger request bodies get 413")
    http_workers: int = Field(1, ge=1, description="HTTP processes; more than 1 runs gunicorn (deploy/gunicorn.conf.py)")
    drain_seconds: float = Field(1.0, ge=0, description="on SIGTERM: seconds /readyz answers 503 before closing")
    grace: float = Field(30.0, ge=0, description="on shutdown: seconds in-flight requests may take")
    docs: bool = Field(True, description="serve /docs and /openapi.json")
    metrics: bool = Field(True, description="serve /metrics and /dashboard")
    log_level: LogLevel = Field(LogLevel.warning, description="debug, info, warning or error")
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description=f"API key clients must send (Authorization: Bearer KEY) on every route but /healthz and /readyz; "
        f"repeatable (env {API_KEY_ENV}: keys separated by spaces)",
    )
    api_key_file: str | None = Field(
        None, description="file of API keys, one a line (blank lines and lines starting with # ignored); read at start"
    )
    public_metrics: bool = Field(False, description="with API keys: /metrics answers without one (a Prometheus scraper)")
    ssl_certfile: str | None = Field(None, description="HTTPS: the server's certificate chain (PEM)")
    ssl_keyfile: str | None = Field(None, description="HTTPS: the certificate's private key (PEM; default: in the certificate file)")
    ssl_ca_certs: str | None = Field(
        None, description="HTTPS: CA certificates (PEM) that client certificates must be signed by; clients without one are refused"
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="browser origins allowed to call the API from their pages (CORS), e.g. https://app.example.com, or *; "
        "repeatable, or separated by commas",
    )
    batch_api: bool = Field(True, description="serve OpenAI's Batch API: /v1/files and /v1/batches (docs/batch.md)")
    batch_dir: str | None = Field(
        None, description="Batch API: where uploaded files, batches and their results are kept (default: batches/ in the cache dir)"
    )
    batch_max_file_bytes: int = Field(100_000_000, ge=1, description="Batch API: largest file POST /v1/files takes (413 past it)")
    batch_max_files: int = Field(1000, ge=1, description="Batch API: most files kept (uploads past it get 400; results are always kept)")
    batch_max_lines: int = Field(50_000, ge=1, description="Batch API: most requests in one batch (a larger input file fails the batch)")
    batch_max_pending: int = Field(100, ge=1, description="Batch API: most batches not yet finished (POST /v1/batches past it gets 429)")
    batch_in_flight: int = Field(
        64, ge=1, description="Batch API: a batch's requests in the batchers at once (online requests are served before them)"
    )

    @field_validator("api_keys")
    @classmethod
    def _keys_are_tokens(cls, keys: list[SecretStr]) -> list[SecretStr]:
        """A key is what a client can send after ``Bearer ``: printable ASCII, no spaces.  The
        message says which key (its place), never the key."""
        for place, key in enumerate(keys, 1):
            problem = key_problem(key.get_secret_value())
            if problem:
                raise ValueError(f"API key {place}: {problem}")
        return keys

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins_by_commas(cls, origins: Any) -> Any:
        """``--cors-origins https://a.example,https://b.example`` is two origins."""
        if isinstance(origins, str):
            origins = [origins]
        if isinstance(origins, (list, tuple)):
            return [part.strip() for origin in origins for part in str(origin).split(",") if part.strip()]
        return origins

    @model_validator(mode="after")
    def _tls_needs_a_certificate(self) -> ServerSettings:
        for name in ("ssl_keyfile", "ssl_ca_certs"):
            if getattr(self, name) is not None and self.ssl_certfile is None:
                raise ValueError(f"{name} needs ssl_certfile (the server's certificate)")
        return self


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
    app_settings: dict[AppName, ModelSettings] = Field(
        default_factory=dict, description="a built-in app's own batching and layout, over the server-wide settings"
    )
    model_settings: dict[str, ModelSettings] = Field(
        default_factory=dict, description="a served model's own batching and layout (by its name), over the server-wide settings"
    )

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
        return options_layer(options).settings()

    @classmethod
    def from_mapping(cls, data: Any) -> "Settings":
        """Settings from a mapping as a config file or ``BATCHSERVE_SETTINGS`` holds it: flat
        names (``port: 9000``), group sections (``server: {port: 9000}``), and ``apps`` and
        ``models`` as lists or as mappings of each one's own settings (:func:`read_mapping`).
        Every problem is reported at once, by its path (:class:`SettingsError`)."""
        return read_mapping(data).settings()

    def for_model(self, name: str) -> "Settings":
        """These settings as the model ``name`` runs with them: its own entry of
        :attr:`model_settings` over the server-wide batching, backend and process settings."""
        own = self.model_settings.get(name)
        given = own.model_dump(exclude_none=True) if own is not None else {}
        if not given:
            return self
        update: dict[str, Any] = {"backend": given["backend"]} if "backend" in given else {}
        for group in ("batching", "process"):
            fields = {key: value for key, value in given.items() if key in GROUPS[group].model_fields}
            if fields:
                update[group] = getattr(self, group).model_copy(update=fields)
        return self.model_copy(update=update)

    def to_env(self) -> None:
        """Hand the settings to processes started from this one (gunicorn): JSON in
        ``BATCHSERVE_SETTINGS``, the API keys apart in ``BATCHSERVE_API_KEY``, so that the JSON,
        wherever it is printed or logged, holds no key."""
        os.environ[SETTINGS_ENV] = self.model_dump_json(exclude={"server": {"api_keys"}})
        keys = " ".join(key.get_secret_value() for key in self.server.api_keys)
        if keys:
            os.environ[API_KEY_ENV] = keys
        else:
            os.environ.pop(API_KEY_ENV, None)

    @classmethod
    def from_env(cls) -> "Settings":
        raw = os.environ.get(SETTINGS_ENV)
        settings = cls.from_mapping(json_mapping(raw, SETTINGS_ENV)) if raw else cls()
        return settings.with_env_keys()

    def with_env_keys(self) -> Settings:
        """These settings plus the API keys of ``BATCHSERVE_API_KEY`` (separated by spaces)."""
        found = os.environ.get(API_KEY_ENV, "").split()
        known = {key.get_secret_value() for key in self.server.api_keys}
        added = [SecretStr(key) for key in dict.fromkeys(found) if key not in known]
        if not added:
            return self
        server = ServerSettings.model_validate({**dict(self.server), "api_keys": [*self.server.api_keys, *added]})
        return self.model_copy(update={"server": server})


#: what a masked key looks like in a dump (pydantic's SecretStr): never a key itself
MASKED_KEY = "**********"


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an API key (None when it can): it must be printable ASCII without
    spaces (what ``Authorization: Bearer KEY`` carries), and not a dump's stars."""
    if not key:
        return "empty"
    if any(not ("!" <= char <= "~") for char in key):
        return "only printable ASCII without spaces (what a client sends after 'Bearer ')"
    if key == MASKED_KEY:
        return f"{MASKED_KEY} is what a settings dump shows in place of a key, not a key"
    return None


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


# --------------------------------------------------------------------------- one model's own settings

#: the settings a model may have of its own (a config file's ``apps:`` and ``models:`` entries):
#: the server-wide settings of these names, with the same types, bounds and help
PER_MODEL = (
    "max_batch_size", "max_latency", "max_batch_tokens", "max_queue_size", "timeout",
    "backend", "workers", "devices", "threads_per_worker",
)


def _own_field(name: str) -> tuple[Any, Any]:
    """The setting ``name`` as one model's own: the server-wide field's type, bounds and help;
    unset (None) means the server-wide value."""
    field = field_info(name)
    annotation: Any = Optional[field.annotation]
    if field.metadata:
        annotation = Annotated.__class_getitem__((annotation, *field.metadata))
    return annotation, Field(None, description=field.description)


ModelSettings = create_model(
    "ModelSettings",
    __base__=_Group,
    __module__=__name__,
    __doc__="One model's (or one app's) own settings; each field is the server-wide setting of its name, unset: that one.",
    **{name: _own_field(name) for name in PER_MODEL},
)
Settings.model_rebuild()


# --------------------------------------------------------------------------- settings from a mapping


class SettingsError(ValueError):
    """Settings refused: every problem, each as the setting's path where it was given and why."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in self.problems))


@dataclass
class Layer:
    """Settings as one source gives them (a config file, ``BATCHSERVE_SETTINGS``, flags), before
    validation: each value by its flat name (unique across the groups), each app's and model's
    own settings, the path each was given at (for messages), and the problems found reading them.

    Layers stack (:meth:`over`); :meth:`settings` validates the result, reporting every problem
    at once by its path (:class:`SettingsError`)."""

    values: dict[str, Any] = dataclass_field(default_factory=dict)
    paths: dict[str, str] = dataclass_field(default_factory=dict)
    apps: dict[str, tuple[str, Any]] = dataclass_field(default_factory=dict)  # name -> (path, own settings)
    models: dict[str, tuple[str, Any]] = dataclass_field(default_factory=dict)
    problems: list[tuple[str, str]] = dataclass_field(default_factory=list)

    def set(self, name: str, value: Any, path: str) -> None:
        if name in self.values:
            self.problems.append((path, f"given twice (also as {self.paths[name]})"))
            return
        self.values[name], self.paths[name] = _listed(field_info(name), value), path

    def over(self, base: "Layer") -> "Layer":
        """This layer's values over ``base``'s.  A model's own settings go with it: when this
        layer names the models, ``base``'s own settings of models no longer served are dropped."""
        models = dict(base.models)
        if "models" in self.values:
            served = {_model_option_name(option) for option in _as_list(self.values["models"])}
            models = {name: entry for name, entry in models.items() if name in served}
        return Layer(
            values={**base.values, **self.values},
            paths={**base.paths, **self.paths},
            apps={**base.apps, **self.apps},
            models={**models, **self.models},
            problems=base.problems + self.problems,
        )

    def settings(self) -> "Settings":
        """The validated settings; :class:`SettingsError` with every problem, by path."""
        problems = list(self.problems)
        top: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        for name, value in self.values.items():
            group = group_of(name)
            (groups[group] if group else top)[name] = value

        def path_of(loc: tuple) -> str:
            return ".".join([self.paths.get(str(loc[0]), str(loc[0])), *map(str, loc[1:])]) if loc else "(top)"

        built = {group: _validated(GROUPS[group], values, path_of, problems) for group, values in groups.items()}
        _validated(Settings, top, path_of, problems)
        app_settings: dict[AppName, Any] = {}
        for name, (path, own) in self.apps.items():
            try:
                app = AppName(name)
            except ValueError:
                problems.append((path, f"unknown app; choose one of {', '.join(a.value for a in AppName)}"))
                continue
            app_settings[app] = _validated(ModelSettings, _own_values(own, path, problems), _under(path), problems)
        model_settings = {
            name: _validated(ModelSettings, _own_values(own, path, problems), _under(path), problems)
            for name, (path, own) in self.models.items()
        }
        if problems:
            raise SettingsError(problems)
        try:
            return Settings(**top, **built, app_settings=app_settings, model_settings=model_settings)
        except ValidationError as error:  # a check across fields
            raise SettingsError([(path_of(e["loc"]), _reason(e)) for e in error.errors()]) from None


def options_layer(options: Mapping[str, Any], paths: Mapping[str, str] | None = None) -> Layer:
    """A :class:`Layer` of flat options (the CLI's): None or an empty list is "not given".
    ``paths`` names each where it was given (default: its own name)."""
    layer = Layer()
    for name, value in options.items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        group_of(name)  # an unknown name is a ValueError here, as a bug of the caller
        layer.set(name, list(value) if isinstance(value, tuple) else value, (paths or {}).get(name, name))
    return layer


def read_mapping(data: Any, prefix: str = "") -> Layer:
    """A :class:`Layer` from a mapping of settings, as a config file or ``BATCHSERVE_SETTINGS`` has it:

    * a setting by its own name at the top (``port: 9000``), or in its group's section
      (``server: {port: 9000}``; groups: batching, process, redis, embeddings, generation, server);
    * ``apps``: a list of built-in apps, or app → that app's own settings (or nothing);
    * ``models``: a list of ``[name=]module:attr``, or name → ``module:attr`` or
      ``{model: module:attr, ...its own settings}``;
    * ``app_settings`` / ``model_settings``: name → own settings (what :meth:`Settings.to_env` writes).

    Own settings are those of :data:`PER_MODEL`.  Unknown names and misshapen sections become
    problems (by path, under ``prefix``), raised when the layer is validated."""
    layer = Layer()
    at = (lambda key: f"{prefix}.{key}") if prefix else str
    if data is None:
        return layer
    if not isinstance(data, Mapping):
        layer.problems.append((prefix or "(top)", f"expected a mapping of settings, got {_kind(data)}"))
        return layer
    for key, value in data.items():
        key = str(key)
        if key in GROUPS:
            for name, item in _section(value, at(key), layer):
                if name in GROUPS[key].model_fields:
                    layer.set(name, item, f"{at(key)}.{name}")
                else:
                    layer.problems.append((f"{at(key)}.{name}", _unknown(name, GROUPS[key].model_fields)))
        elif key == "apps":
            _read_apps(value, at(key), layer)
        elif key == "models":
            _read_models(value, at(key), layer)
        elif key in ("app_settings", "model_settings"):
            entries = layer.apps if key == "app_settings" else layer.models
            for name, own in _section(value, at(key), layer):
                entries[name] = (f"{at(key)}.{name}", own)
        elif key in Settings.model_fields or any(key in model.model_fields for model in GROUPS.values()):
            layer.set(key, value, at(key))
        else:
            known = [*Settings.model_fields, *(name for model in GROUPS.values() for name in model.model_fields)]
            layer.problems.append((at(key), _unknown(key, known)))
    return layer


def _read_apps(value: Any, path: str, layer: Layer) -> None:
    if isinstance(value, Mapping):  # an unknown app is reported with its entry, not twice
        layer.set("apps", [str(name) for name in value if str(name) in AppName._value2member_map_], path)
        for name, own in value.items():
            layer.apps[str(name)] = (f"{path}.{name}", own)
    elif value is not None:
        layer.set("apps", value, path)


def _read_models(value: Any, path: str, layer: Layer) -> None:
    if not isinstance(value, Mapping):
        if value is not None:
            layer.set("models", value, path)
        return
    options = []
    for name, entry in value.items():
        name, here = str(name), f"{path}.{name}"
        if isinstance(entry, Mapping):
            entry = dict(entry)
            reference = entry.pop("model", None)
            layer.models[name] = (here, entry)
        else:
            reference = entry
        if not isinstance(reference, str) or not reference:
            where = f"{here}.model" if isinstance(entry, dict) else here
            layer.problems.append((where, "the model is missing: give it as module:attr"))
            continue
        options.append(f"{name}={reference}")
    layer.set("models", options, path)


def _section(value: Any, path: str, layer: Layer) -> list[tuple[str, Any]]:
    """The entries of a section that must be a mapping (nothing for an empty one)."""
    if value is None:
        return []
    if not isinstance(value, Mapping):
        layer.problems.append((path, f"expected a mapping, got {_kind(value)}"))
        return []
    return [(str(name), item) for name, item in value.items()]


def _own_values(own: Any, path: str, problems: list[tuple[str, str]]) -> dict[str, Any]:
    """One app's or model's own settings as given: a mapping (nothing: none), lists as lists."""
    if own is None:
        return {}
    if not isinstance(own, Mapping):
        problems.append((path, f"expected a mapping of its own settings, got {_kind(own)}"))
        return {}
    return {
        str(name): _listed(field_info(str(name)), value) if name in PER_MODEL else value for name, value in own.items()
    }


def _validated(model: type[BaseModel], values: dict[str, Any], path_of, problems: list[tuple[str, str]]) -> Any:
    """``model`` from ``values``, or None with its problems added (each by ``path_of(loc)``)."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        known = model.model_fields
        for e in error.errors():
            reason = _unknown(str(e["loc"][-1]), known) if e["type"] == "extra_forbidden" else _reason(e)
            problems.append((path_of(e["loc"]), reason))
        return None


def _under(path: str):
    return lambda loc: ".".join([path, *map(str, loc)])


def _reason(error: Any) -> str:
    message = error["msg"]
    return message.removeprefix("Value error, ")


def _unknown(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return "unknown setting" + (f" (did you mean {close[0]}?)" if close else "")


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", dict: "a mapping"}.get(type(value), type(value).__name__)


def _listed(field: Any, value: Any) -> Any:
    """A single string for a list setting (``devices: cuda:0,cuda:1``) as a one-item list."""
    is_list = getattr(field.annotation, "__origin__", None) is list
    return [value] if is_list and isinstance(value, str) else value


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value or [])


def _model_option_name(option: Any) -> str:
    """The name a ``[name=]module:attr`` option serves its model under."""
    from batchserve.model import model_name

    name, sep, reference = str(option).partition("=")
    return name if sep else model_name(reference)


def json_mapping(raw: str, source: str) -> Any:
    """The JSON ``raw`` (settings from the variable ``source``); bad JSON is a :class:`SettingsError` naming it."""
    try:
        return json.loads(raw)
    except ValueError as error:
        raise SettingsError([(source, f"not valid JSON: {error}")]) from None
