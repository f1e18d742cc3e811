"""The `batchserve` command line: options come from batchserve.settings (defaults, bounds,
help), bad values exit with status 2 and a clear message, and the flags reach the server."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest
import typer
from typer.testing import CliRunner

from batchserve import cli
from batchserve.settings import AppName, BackendKind, LogLevel, Settings, field_info, group_of
from tests.conftest import ROOT


def command(name: str):
    return typer.main.get_command(cli.app).commands[name]


def help_segments(name: str) -> dict[str, str]:
    """Each option's part of ``batchserve NAME --help``, whitespace collapsed (lines wrap)."""
    result = CliRunner().invoke(cli.app, [name, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(re.sub(r"-\n\s+", "-", result.output).split())  # a word wrapped at its hyphen joined again
    params = [param for param in command(name).params if param.param_type_name == "option"]
    starts = []
    for param in params:
        match = re.search(rf"(?<![\w/-]){re.escape(param.opts[0])}(?= )", text)
        assert match, f"{param.opts[0]} missing from `{name} --help`"
        starts.append((match.start(), param.name))
    starts.sort()
    ends = [start for start, _ in starts[1:]] + [text.index("--help Show this message")]
    return {name: text[start:end] for (start, name), end in zip(starts, ends)}


def shown_default(name: str) -> str | None:
    """How --help should show the default of setting ``name``: exactly the settings' default."""
    field = field_info(name)
    default = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(default, list):
        return f"({', '.join(map(str, default))})" if default else None
    if default is None or default == "":
        return None
    if isinstance(default, bool):
        flag = name.replace("_", "-")
        return flag if default else f"no-{flag}"
    return str(default.value if hasattr(default, "value") else default)


@pytest.mark.parametrize("name", ["serve", "worker"])
def test_help_shows_each_settings_default(name):
    segments = help_segments(name)
    checked = 0
    for option, segment in segments.items():
        try:
            group_of(option)
        except ValueError:
            continue  # not a setting (none today, but a command may add its own)
        expected = shown_default(option)
        if option == "apps":
            expected = "(embeddings)"  # empty list means the embeddings app when no --model is given
        if expected is None:
            assert "[default:" not in segment, segment
            continue
        assert f"default: {expected}" in segment, (segment, expected)
        checked += 1
    assert checked >= (15 if name == "serve" else 6)


def serve_settings(monkeypatch, *args: str) -> Settings:
    """The Settings that ``batchserve serve ARGS`` would serve (no server is started)."""
    seen: list[Settings] = []
    monkeypatch.setattr(cli, "run_server", seen.append)
    result = CliRunner().invoke(cli.app, ["serve", *args])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_serve_without_options_is_the_settings_defaults(monkeypatch):
    settings = serve_settings(monkeypatch)
    assert settings == Settings()
    assert settings.app_names == [AppName.embeddings]


def test_serve_options_reach_their_groups(monkeypatch):
    settings = serve_settings(
        monkeypatch,
        "--app", "generation", "--app", "infill", "--model", "m=tests.fakes:echo",
        "--host", "0.0.0.0", "--port", "9001", "--max-batch-size", "8", "--max-latency", "0", "--timeout", "5",
        "--backend", "process", "--workers", "2", "--devices", "cuda:0,cuda:1", "--threads-per-worker", "3",
        "--redis-url", "redis://h:1/0", "--prefix", "blue", "--generation-max-rows", "4",
        "--no-docs", "--no-metrics", "--log-level", "info",
    )
    assert settings.apps == [AppName.generation, AppName.infill] and settings.models == ["m=tests.fakes:echo"]
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 9001)
    assert (settings.batching.max_batch_size, settings.batching.max_latency, settings.batching.timeout) == (8, 0, 5)
    assert settings.backend is BackendKind.process
    assert (settings.process.workers, settings.process.devices, settings.process.threads_per_worker) == (
        2, ["cuda:0,cuda:1"], 3)
    assert (settings.redis.redis_url, settings.redis.redis_prefix) == ("redis://h:1/0", "blue")
    assert settings.generation.generation_max_rows == 4
    assert settings.server.docs is False and settings.server.metrics is False
    assert settings.server.log_level is LogLevel.info


def test_worker_options_and_the_backend_it_picks(monkeypatch):
    import batchserve.backends.redis.worker

    seen: list[Settings] = []
    models: list[dict] = []
    monkeypatch.setattr(
        batchserve.backends.redis.worker, "run_worker", lambda settings, given: (seen.append(settings), models.append(given))
    )
    runner = CliRunner()
    assert runner.invoke(cli.app, ["worker", "--redis-url", "redis://h/0", "--model", "tests.fakes:echo"]).exit_code == 0
    assert runner.invoke(cli.app, ["worker", "--redis-url", "redis://h/0", "--workers", "2"]).exit_code == 0
    alone, pooled = seen
    assert alone.redis.redis_url == "redis://h/0" and alone.models == ["tests.fakes:echo"]
    assert alone.backend is BackendKind.thread and pooled.backend is BackendKind.process
    assert pooled.process.workers == 2 and pooled.app_names == [AppName.embeddings]
    assert alone.batching.max_queue_size == cli.WORKER_QUEUE_SIZE  # the stream is the queue
    # the apps' batched models, by the names serve gives them; no HTTP service is built
    assert [list(given) for given in models] == [["echo"], ["all-MiniLM-L6-v2"]]
    missing = runner.invoke(cli.app, ["worker", "--model", "tests.fakes:echo"])
    assert missing.exit_code == 2 and "--redis-url" in missing.output


@pytest.mark.parametrize(
    "args, named",
    [
        (["--timeout", "0"], "--timeout"),  # a strict bound: the settings refuse it
        (["--max-timeout", "-1"], "--max-timeout"),
    ],
)
def test_a_value_the_settings_refuse_exits_2_with_one_line(monkeypatch, args, named):
    monkeypatch.setattr(cli, "run_server", lambda settings: pytest.fail("a refused value reached the server"))
    result = CliRunner().invoke(cli.app, ["serve", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchserve: ") and named in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, named",
    [
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--port", "70000"], "--port"),
        (["--backend", "carrier-pigeon"], "--backend"),
        (["--app", "nope"], "--app"),
        (["--log-level", "loud"], "--log-level"),
        (["--workers", "many"], "--workers"),
    ],
)
def test_a_value_the_options_refuse_exits_2_naming_the_option(monkeypatch, args, named):
    monkeypatch.setattr(cli, "run_server", lambda settings: pytest.fail("a refused value reached the server"))
    result = CliRunner().invoke(cli.app, ["serve", *args])
    assert result.exit_code == 2
    assert named in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    "devices, says", [("cuda:99", "no device cuda:99 on this machine"), ("tpu:0", "unknown device 'tpu:0'")]
)
def test_a_device_that_is_not_here_exits_2_with_one_line_before_anything_starts(monkeypatch, devices, says):
    monkeypatch.setattr(cli, "run_gunicorn", lambda settings: pytest.fail("started with a missing device"))
    result = CliRunner().invoke(cli.app, ["serve", "--backend", "process", "--devices", devices, "--http-workers", "2"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr


@pytest.mark.parametrize(
    "bug", [TypeError("unsupported operand type(s)"), AttributeError("'NoneType' object has no attribute 'x'"),
            ModuleNotFoundError("No module named 'batchserve.nothing'", name="batchserve.nothing")],
)
def test_a_bug_is_not_a_user_error_it_keeps_its_traceback(monkeypatch, bug):
    import batchserve.server.app

    def broken(settings):
        raise bug

    monkeypatch.setattr(batchserve.server.app, "create_app", broken)
    result = CliRunner().invoke(cli.app, ["serve"])
    assert result.exception is bug  # raised on (typer prints it with its traceback), not "batchserve: ..." and 2
    assert "batchserve: " not in result.stderr


@pytest.mark.parametrize(
    "reference, says",
    [
        ("no_such_module_here:predict", "cannot import no_such_module_here: No module named 'no_such_module_here'"),
        ("needs_a_package:predict", "cannot import needs_a_package: No module named 'package_not_installed'"),
        ("tests.fakes:missing", "module tests.fakes has no attribute 'missing'"),
        ("tests.fakes:echo.nope", "tests.fakes:echo has no attribute 'nope'"),
        ("tests.fakes", "expected 'module:attribute', got 'tests.fakes'"),
        ("tests.fakes:__name__", "cannot use 'tests.fakes' as a model: give a function or an object with predict()"),
    ],
)
def test_a_bad_model_reference_is_a_user_error_of_one_line(monkeypatch, tmp_path, reference, says):
    (tmp_path / "needs_a_package.py").write_text("import package_not_installed\n")
    monkeypatch.chdir(tmp_path)  # where --model modules are looked for, as by the real command
    monkeypatch.setattr("batchserve.server.run.serve", lambda *args: pytest.fail("served a bad --model"))
    result = CliRunner().invoke(cli.app, ["serve", "--model", reference])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"batchserve: --model {reference}: {says}"]


# --------------------------------------------------------------------------- the real command


def test_bad_model_reference_fails_fast(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "batchserve.cli", "serve", "--model", "tests.fakes:missing"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "missing" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_docs_and_metrics_can_be_turned_off(start_server):
    server = start_server("--model", "tests.fakes:echo", "--no-docs", "--no-metrics")
    for path in ("/docs", "/openapi.json", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 404, path
    assert httpx.post(f"{server.url}/models/echo/predict", json={"inputs": [1]}).json() == {"outputs": [1]}
