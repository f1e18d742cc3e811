"""Every way to start batchserve that README.md, docs/ and deploy/ document works.

* Each ``batchserve serve|worker|config`` command line they show takes its options: checked
  in this process, nothing started (``serve``'s through ``batchserve config``, which has its
  options and starts nothing; ``worker``'s with its Redis loop replaced).
* For real: gunicorn run by hand with deploy/gunicorn.conf.py and each documented
  ``BATCHSERVE_SETTINGS`` (issue 18: both documented examples were refused with
  "http_workers: Extra inputs are not permitted") or ``BATCHSERVE_CONFIG``; ``serve --config``
  with the documented file; ``worker --config`` reading the fronts' own file; ``config``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from batchserve import cli
from batchserve.config import from_environment
from batchserve.procinfo import children, descendants, state
from tests.conftest import PYTHONPATH, ROOT, free_port, terminate
from tests.redis_fixtures import needs_redis, redis_server, wait_for_workers  # noqa: F401 - fixtures

PAGES = [ROOT / "README.md", *sorted(path for path in (ROOT / "docs").glob("*.md") if path.name != "ARCHITECTURE.md")]
DEPLOY = [ROOT / "deploy" / "gunicorn.conf.py", ROOT / "deploy" / "Dockerfile"]
COMMAND = re.compile(r"^(?:\$ )?(?:docker run .*?\s)?(?:[A-Z_]+=\S+\s+)*batchserve (?P<command>serve|worker|config)\b(?P<args>.*)$")
GUNICORN = re.compile(r"""BATCHSERVE_SETTINGS='(?P<json>[^']*)'[\s\\]*gunicorn -c deploy/gunicorn\.conf\.py""")
#: a YAML block that starts with ``# NAME.yaml`` is that file, for the commands of its page
NAMED_YAML = re.compile(r"^```ya?ml\n# (?P<name>[\w.-]+\.ya?ml)\n(?P<body>.*?)^```", re.DOTALL | re.MULTILINE)

#: the module the documented config file names (the README's quickstart has one like it)
MY_MODEL = '''\
def predict(batch):
    return [len(text) for text in batch]


class Sentiment:
    def load(self):
        self.positive = {"good", "great", "love"}

    def predict(self, batch):
        return [sum(word in self.positive for word in text.split()) for text in batch]
'''


def code_lines(path: Path) -> list[tuple[int, str]]:
    """Lines that are code: in a page's fenced blocks; in deploy files, literal blocks and
    comments (indented by 2 or more spaces after an optional ``#``).  Continued lines joined."""
    lines, fenced, joined, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if path.suffix == ".md":
            if line.startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                continue
            text = line.strip()
        else:
            body = line.lstrip("#")
            if not body.startswith("  "):
                continue
            text = body.strip()
        if not joined:
            start = number
        if text.endswith("\\"):
            joined += text[:-1] + " "
            continue
        lines.append((start, joined + text))
        joined = ""
    return lines


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, command, args)`` of every ``batchserve serve|worker|config`` line shown."""
    found = []
    for path in PAGES + DEPLOY:
        for number, line in code_lines(path):
            match = COMMAND.match(line)
            if match is None:
                continue
            args = []
            for token in shlex.split(match["args"], comments=True):
                if token in ("|", "&", "&&", ";", ">"):
                    break
                args.append(token)
            found.append((f"{path.relative_to(ROOT)}:{number}", match["command"], args))
    return found


def named_files(page: Path) -> dict[str, str]:
    return {match["name"]: match["body"] for match in NAMED_YAML.finditer(page.read_text())}


COMMANDS = documented_commands()


def test_the_docs_show_every_kind_of_start():
    kinds = {command for _, command, _ in COMMANDS}
    assert kinds == {"serve", "worker", "config"}, kinds
    assert any("--config" in args for _, command, args in COMMANDS if command == "serve")
    assert len(documented_gunicorn_settings()) >= 2  # deploy/gunicorn.conf.py and the serving page


@pytest.mark.parametrize("where, command, args", COMMANDS, ids=[where for where, _, _ in COMMANDS])
def test_a_documented_command_takes_its_options(where, command, args, monkeypatch, tmp_path):
    import batchserve.backends.redis.worker

    page = ROOT / where.partition(":")[0]
    for name, body in named_files(page).items():  # `--config batchserve.yaml` finds the page's file
        (tmp_path / name).write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "run_server", lambda settings: pytest.fail(f"{where}: config started a server"))
    monkeypatch.setattr(batchserve.backends.redis.worker, "run_worker", lambda settings, models: None)
    monkeypatch.setattr(cli, "check_devices", lambda settings: None)  # the docs show GPUs this machine lacks
    argv = ["config", *args] if command == "serve" else [command, *args]
    result = CliRunner().invoke(cli.app, argv)
    assert result.exit_code == 0, f"{where}: batchserve {command} {shlex.join(args)}\n{result.output}"


# --------------------------------------------------------------------------- started for real


def documented_gunicorn_settings() -> list[tuple[str, str]]:
    found = []
    for path in PAGES + DEPLOY:
        for match in GUNICORN.finditer(path.read_text()):
            found.append((str(path.relative_to(ROOT)), match["json"]))
    return found


def gunicorn(env: dict[str, str]) -> subprocess.Popen:
    """``gunicorn -c deploy/gunicorn.conf.py`` as the docs run it, from the checkout."""
    inherited = {name: value for name, value in os.environ.items() if name not in ("BATCHSERVE_CONFIG", "BATCHSERVE_SETTINGS")}
    env = {**inherited, "HF_HUB_OFFLINE": "1", "PYTHONPATH": PYTHONPATH, **env}
    command = [str(Path(sys.executable).parent / "gunicorn"), "-c", "deploy/gunicorn.conf.py"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_ready(process: subprocess.Popen, url: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{process.stdout.read().decode(errors='replace')}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("not ready in time")


def http_workers(process: subprocess.Popen, expected: int = 2, timeout: float = 30.0) -> int:
    """The master's workers, once it has forked them all (``expected`` or more) or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while len(children(process.pid)) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(children(process.pid))


def stop_cleanly(process: subprocess.Popen) -> None:
    """SIGTERM: the master and every process under it exit, status 0."""
    everything = descendants(process.pid)
    terminate(process)
    output = process.stdout.read().decode(errors="replace")
    process.stdout.close()
    assert process.returncode == 0, output
    assert all(state(pid) is None for pid in everything), output


@pytest.mark.parametrize("where, raw", documented_gunicorn_settings(), ids=[w for w, _ in documented_gunicorn_settings()])
def test_gunicorn_by_hand_with_the_documented_settings(where, raw, monkeypatch):
    monkeypatch.setenv("BATCHSERVE_SETTINGS", raw)
    monkeypatch.delenv("BATCHSERVE_CONFIG", raising=False)
    documented = from_environment()  # refused before: "http_workers: Extra inputs are not permitted"
    assert documented.server.http_workers > 1
    # the same settings on loopback, a free port and a light model instead of the embeddings
    port = free_port()
    run = {**json.loads(raw), "host": "127.0.0.1", "port": port, "models": ["tests.fakes:double"]}
    process = gunicorn({"BATCHSERVE_SETTINGS": json.dumps(run)})
    try:
        wait_ready(process, f"http://127.0.0.1:{port}")
        assert http_workers(process, documented.server.http_workers) == documented.server.http_workers
        answer = httpx.post(f"http://127.0.0.1:{port}/models/double/predict", json={"inputs": [2, 3]}, timeout=10)
        assert answer.json() == {"outputs": [4, 6]}
    finally:
        stop_cleanly(process)


def test_gunicorn_by_hand_with_a_config_file(tmp_path):
    port = free_port()
    config = tmp_path / "batchserve.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            server: {{host: 127.0.0.1, port: {port}, http_workers: 2}}
            models:
              small: {{model: tests.config_models:predict, max_batch_size: 2}}
              big:   {{model: tests.config_models:Big, max_batch_size: 32, max_latency: 0.05}}
            """
        )
    )
    process = gunicorn({"BATCHSERVE_CONFIG": str(config)})
    try:
        ready = wait_ready(process, f"http://127.0.0.1:{port}")
        models = ready["services"]["models"]["models"]
        assert models["small"]["batching"]["max_batch_size"] == 2 and models["big"]["batching"]["max_latency"] == 0.05
        assert http_workers(process) == 2
    finally:
        stop_cleanly(process)


def test_gunicorn_by_hand_with_bad_settings_says_why(tmp_path):
    process = gunicorn({"BATCHSERVE_SETTINGS": '{"http_workers": 0}'})
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 2
    assert output.strip() == "batchserve: BATCHSERVE_SETTINGS.http_workers: Input should be greater than or equal to 1"


def test_serve_with_the_documented_config_file(tmp_path):
    """The settings page's ``batchserve.yaml``, run where it and its models' module are (as a
    user would): each model and the embeddings app run with their own batching."""
    (tmp_path / "batchserve.yaml").write_text(named_files(ROOT / "docs" / "settings.md")["batchserve.yaml"])
    (tmp_path / "my_model.py").write_text(MY_MODEL)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "batchserve.cli", "serve", "--config", "batchserve.yaml", "--port", str(port),
         "--drain-seconds", "0"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        ready = wait_ready(process, f"http://127.0.0.1:{port}", timeout=300)["services"]
        assert ready["models"]["models"]["small"]["batching"]["max_batch_size"] == 2
        assert ready["models"]["models"]["big"]["batching"]["max_latency"] == 0.05
        embeddings = ready["embeddings"]["models"]["all-MiniLM-L6-v2"]
        assert embeddings["batching"]["max_batch_size"] == 64 and embeddings["workers"] == 2
        answer = httpx.post(f"http://127.0.0.1:{port}/models/big/predict", json={"inputs": ["a great day"]}, timeout=30)
        assert answer.json() == {"outputs": [1]}
    finally:
        stop_cleanly(process)


def test_config_prints_the_effective_settings(tmp_path):
    (tmp_path / "batchserve.yaml").write_text(named_files(ROOT / "docs" / "settings.md")["batchserve.yaml"])
    done = subprocess.run(
        [sys.executable, "-m", "batchserve.cli", "config", "--config", "batchserve.yaml", "--port", "9000"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if not line.startswith("#")}
    assert rows["server.port"] == ["9000", "flag", "(--port)"]
    assert rows["models.small.max_batch_size"][:2] == ["2", "file"]


@needs_redis
def test_a_worker_reads_the_fronts_config_file(redis_server, start_server, tmp_path):  # noqa: F811
    """One file for fronts and workers: the worker serves the same models, each with its own batch size."""
    config = tmp_path / "batchserve.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            backend: redis
            redis: {{redis_url: "{redis_server.url()}", redis_prefix: cfg}}
            models:
              small: {{model: tests.config_models:predict, max_batch_size: 2}}
              big:   {{model: tests.config_models:Big, max_batch_size: 32, max_latency: 0.05}}
            """
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": PYTHONPATH}
    worker = subprocess.Popen(
        [sys.executable, "-m", "batchserve.cli", "worker", "--config", str(config)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        client = redis_server.client()
        for model in ("small", "big"):
            wait_for_workers(client, model, 1, prefix="cfg")
        front = start_server("--config", str(config))

        async def sizes(model: str) -> list[int]:
            async with httpx.AsyncClient(base_url=front.url, timeout=60) as http:
                answers = await asyncio.gather(
                    *(http.post(f"/models/{model}/predict", json={"inputs": [index]}) for index in range(30))
                )
            assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
            return [answer.json()["outputs"][0]["batch"] for answer in answers]

        small, big = asyncio.run(sizes("small")), asyncio.run(sizes("big"))
        assert max(small) == 2 and max(big) > 2, (small, big)
    finally:
        terminate(worker)
        worker.stdout.close()
