"""One config file (``--config FILE``): the settings of settings.py by the same names, each
app's and model's own batching, flags over the file over the defaults, and every problem
refused at start with the key's path (exit status 2, never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from batchserve import cli
from batchserve.apps import with_app_settings
from batchserve.apps.embeddings import MODEL_NAME
from batchserve.batching import Batcher
from batchserve.config import from_environment
from batchserve.model import ModelSpec
from batchserve.settings import (
    PER_MODEL,
    SETTINGS_ENV,
    AppName,
    BackendKind,
    ModelSettings,
    Settings,
    SettingsError,
    field_info,
)
from tests.conftest import ROOT

#: the shape issue 18 asks for, as a user writes it
ISSUE_FILE = """\
server: {port: 8000, api_key_file: /run/secrets/keys}
apps:
  embeddings: {max_batch_size: 64, workers: 2}
models:
  small: {model: tests.config_models:predict, max_batch_size: 2}
  big:   {model: tests.config_models:Big, max_batch_size: 32, max_latency: 0.05, timeout: 30}
"""


@pytest.fixture
def config_file(tmp_path):
    def write(text: str, name: str = "batchserve.yaml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write


def serve_settings(monkeypatch, *args: str, env: dict | None = None) -> Settings:
    """The Settings that ``batchserve serve ARGS`` would serve (nothing is started)."""
    seen: list[Settings] = []
    monkeypatch.setattr(cli, "run_server", seen.append)
    result = CliRunner().invoke(cli.app, ["serve", *args], env=env)
    assert result.exit_code == 0, result.output
    return seen[0]


def refused(monkeypatch, *args: str, command: str = "serve") -> str:
    """What ``batchserve COMMAND ARGS`` prints when it refuses its settings: one line, status 2."""
    monkeypatch.setattr(cli, "run_server", lambda settings: pytest.fail("refused settings reached the server"))
    result = CliRunner().invoke(cli.app, [command, *args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # typer's exit, not an error escaping
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchserve: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# --------------------------------------------------------------------------- the file's shape


def test_the_issues_file_gives_each_model_its_own_batching(monkeypatch, config_file):
    settings = serve_settings(monkeypatch, "--config", config_file(ISSUE_FILE))
    assert settings.server.port == 8000 and settings.server.api_key_file == "/run/secrets/keys"
    assert settings.apps == [AppName.embeddings]
    assert settings.models == ["small=tests.config_models:predict", "big=tests.config_models:Big"]
    assert settings.app_settings[AppName.embeddings] == ModelSettings(max_batch_size=64, workers=2)
    small, big = settings.for_model("small"), settings.for_model("big")
    assert (small.batching.max_batch_size, small.batching.max_latency) == (2, settings.batching.max_latency)
    assert (big.batching.max_batch_size, big.batching.max_latency, big.batching.timeout) == (32, 0.05, 30)
    assert settings.for_model("another") is settings  # no entry: the server-wide settings
    # the apps' entries reach their batched models by the names their batchers have
    embeddings = with_app_settings(settings).for_model(MODEL_NAME)
    assert (embeddings.batching.max_batch_size, embeddings.process.workers) == (64, 2)


def test_own_settings_are_the_server_wide_fields_with_their_bounds():
    for name in PER_MODEL:
        own, server_wide = ModelSettings.model_fields[name], field_info(name)
        assert own.description == server_wide.description and own.metadata == server_wide.metadata
        assert own.default is None  # unset: the server-wide value
    with pytest.raises(SettingsError, match=r"^models\.m\.timeout: Input should be greater than 0$"):
        Settings.from_mapping({"models": {"m": {"model": "tests.fakes:double", "timeout": 0}}})


def test_groups_and_flat_names_are_the_same_settings():
    flat = Settings.from_mapping({"port": 9001, "max_batch_size": 8, "devices": "cuda:0,cuda:1", "backend": "process"})
    grouped = Settings.from_mapping(
        {"server": {"port": 9001}, "batching": {"max_batch_size": 8}, "process": {"devices": ["cuda:0,cuda:1"]},
         "backend": "process"}
    )
    assert flat == grouped and grouped.process.devices == ["cuda:0,cuda:1"]
    with pytest.raises(SettingsError, match=r"^server\.port: given twice \(also as port\)$"):
        Settings.from_mapping({"port": 1, "server": {"port": 2}})
    listed = Settings.from_mapping({"apps": ["embeddings", "infill"], "models": ["m=tests.fakes:double"]})
    assert listed.apps == [AppName.embeddings, AppName.infill] and listed.models == ["m=tests.fakes:double"]


def test_the_batcher_of_a_model_takes_its_own_settings():
    settings = Settings.from_mapping(
        {"max_batch_size": 16, "models": {"m": {"model": "tests.fakes:double", "max_batch_size": 3, "timeout": 7}}}
    )
    mine = Batcher.from_settings(ModelSpec("tests.fakes:double"), settings, "m")
    other = Batcher.from_settings(ModelSpec("tests.fakes:double"), settings, "other")
    assert (mine.max_batch_size, mine.timeout, mine.max_latency) == (3, 7, settings.batching.max_latency)
    assert (other.max_batch_size, other.timeout) == (16, settings.batching.timeout)


def test_an_app_without_a_batcher_refuses_settings_of_its_own():
    settings = Settings.from_mapping({"apps": {"generation": {"max_batch_size": 4}}})
    with pytest.raises(ValueError, match=r"apps\.generation: the generation app has no batcher to take max_batch_size"):
        with_app_settings(settings)


def test_a_models_entry_wins_over_its_apps():
    settings = Settings.from_mapping(
        {"apps": {"embeddings": {"max_batch_size": 64, "workers": 2}},
         "model_settings": {MODEL_NAME: {"max_batch_size": 8}}}
    )
    own = with_app_settings(settings).model_settings[MODEL_NAME]
    assert (own.max_batch_size, own.workers) == (8, 2)


# --------------------------------------------------------------------------- refused at start


@pytest.mark.parametrize(
    "text, says",
    [
        ("models:\n  big: {model: m:Big, max_batch_sise: 3}\n",
         "models.big.max_batch_sise: unknown setting (did you mean max_batch_size?)"),
        ("models:\n  big: {model: m:Big, max_batch_size: 0}\n",
         "models.big.max_batch_size: Input should be greater than or equal to 1"),
        ("apps:\n  embeddings: {workers: many}\n",
         "apps.embeddings.workers: Input should be a valid integer"),
        ("apps:\n  embedings: {}\n", "apps.embedings: unknown app; choose one of embeddings, generation, infill, all"),
        ("models:\n  big: {max_batch_size: 2}\n", "models.big.model: the model is missing: give it as module:attr"),
        ("server: {prot: 9000}\n", "server.prot: unknown setting (did you mean port?)"),
        ("max_batch: 3\n", "max_batch: unknown setting (did you mean max_batch_size?)"),
        ("server: 9000\n", "server: expected a mapping, got int"),
        ("- port: 9000\n", "(top): expected a mapping of settings, got a list"),
        ("backend: carrier-pigeon\n", "backend: Input should be 'thread', 'process' or 'redis'"),
        ("server: {port: 8000\nmodels: [\n", "not valid YAML: line 2, column 7: expected ',' or '}', but got ':'"),
    ],
    ids=["unknown-key", "bad-value", "bad-type", "unknown-app", "no-model", "unknown-group-key", "unknown-top-key",
         "not-a-section", "not-a-mapping", "bad-enum", "bad-yaml"],
)
def test_a_bad_file_is_refused_naming_the_key(monkeypatch, config_file, text, says):
    assert says in refused(monkeypatch, "--config", config_file(text))


def test_a_missing_file_and_a_directory_are_refused(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere.yaml"
    assert refused(monkeypatch, "--config", str(missing)) == f"batchserve: config file {missing}: not found"
    assert "is a directory" in refused(monkeypatch, "--config", str(tmp_path))


def test_every_problem_is_named_at_once(monkeypatch, config_file):
    line = refused(monkeypatch, "--config", config_file("server: {prot: 1}\nmodels:\n  big: {model: m:B, timeout: -1}\n"))
    assert "server.prot: unknown setting" in line and "models.big.timeout: Input should be greater than 0" in line


def test_a_bad_file_never_prints_a_traceback(config_file):
    """The real command, in a process of its own: one line on stderr and status 2."""
    path = config_file("models:\n  big: {model: tests.config_models:Big, max_batch_size: 0}\n")
    for command in ("serve", "worker", "config"):
        done = subprocess.run(
            [sys.executable, "-m", "batchserve.cli", command, "--config", path],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr == "batchserve: models.big.max_batch_size: Input should be greater than or equal to 1\n"


# --------------------------------------------------------------------------- precedence


def config_json(*args: str, env: dict | None = None) -> dict:
    result = CliRunner().invoke(cli.app, ["config", "--json", *args], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_flag_over_file_over_default(config_file):
    path = config_file(
        """\
        server: {port: 9000, host: 0.0.0.0}
        batching: {max_batch_size: 8}
        models:
          small: {model: tests.config_models:predict, max_batch_size: 2}
        """
    )
    shown = config_json("--config", path, "--port", "9001")
    settings, sources = shown["settings"], shown["sources"]
    assert (settings["server"]["port"], sources["server.port"]) == (9001, "flag (--port)")
    assert (settings["server"]["host"], sources["server.host"]) == ("0.0.0.0", f"file ({path}: server.host)")
    assert (settings["batching"]["max_batch_size"], sources["batching.max_batch_size"]) == (
        8, f"file ({path}: batching.max_batch_size)")
    assert (settings["batching"]["max_latency"], sources["batching.max_latency"]) == (0.01, "default")
    assert sources["models.small.max_batch_size"] == f"file ({path}: models.small.max_batch_size)"
    assert sources["models.small.max_latency"] == "server-wide (batching.max_latency: default)"
    # a flag given with the default's value still wins over the file
    assert config_json("--config", path, "--max-batch-size", "64")["settings"]["batching"]["max_batch_size"] == 64
    # the file is also found through BATCHSERVE_CONFIG
    assert config_json(env={"BATCHSERVE_CONFIG": path})["settings"]["server"]["port"] == 9000


def test_an_options_environment_variable_is_over_the_file(config_file):
    path = config_file("server: {api_keys: [sk-from-file], port: 9000}\n")
    shown = config_json("--config", path, env={"BATCHSERVE_API_KEY": "sk-from-env"})
    assert shown["sources"]["server.api_keys"] == "env (BATCHSERVE_API_KEY)"
    assert shown["settings"]["server"]["api_keys"] == ["**********"]  # one key, the variable's, masked
    assert "sk-from" not in json.dumps(shown)


def test_serve_runs_with_what_config_shows(monkeypatch, config_file):
    path = config_file("server: {port: 9000}\nmax_latency: 0.2\nmodels:\n  m: {model: tests.fakes:double, workers: 2}\n")
    shown = config_json("--config", path, "--timeout", "5")["settings"]
    served = serve_settings(monkeypatch, "--config", path, "--timeout", "5")
    assert served.model_dump(mode="json") == shown
    assert (served.server.port, served.batching.max_latency, served.batching.timeout) == (9000, 0.2, 5)


def test_the_config_command_prints_each_setting_and_where_it_came_from(config_file):
    path = config_file("server: {port: 9000}\nmodels:\n  small: {model: tests.config_models:predict, max_batch_size: 2}\n")
    result = CliRunner().invoke(cli.app, ["config", "--config", path, "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if not line.startswith("#")}
    assert rows["server.port"].split()[1:3] == ["9000", "file"]
    assert rows["server.host"].split()[1:] == ['"0.0.0.0"', "flag", "(--host)"]
    assert rows["batching.max_batch_size"].split()[1:] == ["64", "default"]
    assert rows["models.small.max_batch_size"].split()[1:3] == ["2", "file"]


def test_flags_naming_models_replace_the_files(monkeypatch, config_file):
    path = config_file("models:\n  small: {model: tests.config_models:predict, max_batch_size: 2}\n")
    settings = serve_settings(monkeypatch, "--config", path, "--model", "tests.fakes:double")
    assert settings.models == ["tests.fakes:double"] and settings.model_settings == {}


# --------------------------------------------------------------------------- worker --config


def test_the_worker_reads_the_fronts_file(monkeypatch, config_file):
    import batchserve.backends.redis.worker

    seen: list[tuple[Settings, dict]] = []
    monkeypatch.setattr(batchserve.backends.redis.worker, "run_worker", lambda settings, models: seen.append((settings, models)))
    path = config_file(ISSUE_FILE + "backend: redis\nredis_url: redis://h:1/0\nredis_prefix: blue\nmax_queue_size: 50\n")
    result = CliRunner().invoke(cli.app, ["worker", "--config", path])
    assert result.exit_code == 0, result.output
    ((settings, models),) = seen
    assert (settings.redis.redis_url, settings.redis.redis_prefix) == ("redis://h:1/0", "blue")
    assert list(models) == [MODEL_NAME, "small", "big"]  # the same models, by the same names, as the fronts
    assert settings.backend is BackendKind.thread  # the fronts' redis backend is not the worker's
    assert settings.batching.max_queue_size == cli.WORKER_QUEUE_SIZE  # the stream is the queue
    small, big, embeddings = (settings.for_model(name) for name in ("small", "big", MODEL_NAME))
    assert (small.batching.max_batch_size, small.backend) == (2, BackendKind.thread)
    assert (big.batching.max_batch_size, big.batching.max_latency) == (32, 0.05)
    assert (embeddings.batching.max_batch_size, embeddings.backend, embeddings.process.workers) == (
        64, BackendKind.process, 2)  # the app's own workers: model processes here
    # the worker's flags override the file as serve's do
    seen.clear()
    assert CliRunner().invoke(cli.app, ["worker", "--config", path, "--max-batch-size", "4"]).exit_code == 0
    assert seen[0][0].batching.max_batch_size == 4 and seen[0][0].for_model("small").batching.max_batch_size == 2


def test_a_worker_without_redis_url_anywhere_is_refused(monkeypatch, config_file):
    line = refused(monkeypatch, "--config", config_file("models: [tests.fakes:double]\n"), command="worker")
    assert "--redis-url" in line


# --------------------------------------------------------------------------- BATCHSERVE_SETTINGS


@pytest.mark.parametrize(
    "raw", ['{"http_workers": 4}', '{"host": "0.0.0.0", "port": 8000, "http_workers": 4}', '{"server": {"http_workers": 4}}']
)
def test_settings_json_takes_flat_names_and_groups(monkeypatch, raw):
    """The two documented ways to run gunicorn by hand were refused ("http_workers: Extra
    inputs are not permitted"): the JSON takes the names a config file does."""
    monkeypatch.setenv(SETTINGS_ENV, raw)
    assert Settings.from_env().server.http_workers == 4
    assert from_environment().server.http_workers == 4


def test_settings_json_errors_name_the_variable_and_key(monkeypatch):
    monkeypatch.setenv(SETTINGS_ENV, '{"http_worker": 4}')
    with pytest.raises(SettingsError, match=r"^BATCHSERVE_SETTINGS\.http_worker: unknown setting \(did you mean http_workers\?\)$"):
        from_environment()
    monkeypatch.setenv(SETTINGS_ENV, "{http_workers: 4}")
    with pytest.raises(SettingsError, match=r"^BATCHSERVE_SETTINGS: not valid JSON"):
        from_environment()


def test_own_settings_travel_to_gunicorns_processes(monkeypatch, config_file):
    settings = Settings.from_mapping(
        {"apps": {"embeddings": {"workers": 2}}, "models": {"small": {"model": "tests.config_models:predict", "max_batch_size": 2}}}
    )
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    settings.to_env()
    assert Settings.from_env() == settings
    # with BATCHSERVE_CONFIG too (the variable --config reads), the JSON the CLI wrote wins
    monkeypatch.setenv("BATCHSERVE_CONFIG", config_file("models:\n  small: {model: tests.config_models:predict, max_batch_size: 9}\n"))
    assert from_environment() == settings


# --------------------------------------------------------------------------- threads follow the layout


def test_process_workers_share_the_cores_with_every_http_process(monkeypatch):
    """Each HTTP process has its own model workers: 8 cores, 2 HTTP processes x 2 workers = 2 threads each."""
    import batchserve.devices
    from batchserve.backends.process import ProcessBackend

    monkeypatch.setattr(batchserve.devices, "cpu_count", lambda: 8)
    spec = ModelSpec("tests.fakes:double")

    def threads(settings: Settings, name: str = "m") -> int:
        return ProcessBackend.from_settings(spec, settings.for_model(name), name).threads

    assert threads(Settings.from_options(backend="process", workers=2)) == 4
    assert threads(Settings.from_options(backend="process", workers=2, http_workers=2)) == 2
    assert threads(Settings.from_options(backend="process", workers=3, http_workers=4)) == 1  # never 0
    assert threads(Settings.from_options(backend="process", workers=2, http_workers=2, threads_per_worker=3)) == 3
    own = Settings.from_mapping(
        {"backend": "process", "workers": 2, "http_workers": 2,
         "models": {"m": {"model": "tests.fakes:double", "threads_per_worker": 1}, "w": {"model": "tests.fakes:double", "workers": 4}}}
    )
    assert threads(own, "m") == 1  # its own thread count
    assert threads(own, "w") == 1  # its own workers: 8 cores // (2 x 4)


def test_a_process_given_its_share_tells_every_runtime(monkeypatch):
    from batchserve import devices
    from batchserve.runtimes.onnx.encoder import default_threads

    for name in devices.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(devices, "cpu_count", lambda: 6)
    torch_threads: list[int] = []
    monkeypatch.setattr(devices, "set_torch_threads", torch_threads.append)  # this process's torch stays as it is
    assert devices.process_threads() == default_threads() == 6  # nothing given: every core
    devices.share_cores(3)  # what a gunicorn HTTP worker does after the fork
    assert devices.process_threads() == default_threads() == 3 and torch_threads == [3]
    assert all(os.environ[name] == "3" for name in devices.THREAD_ENV)
