"""API keys (``--api-key``, ``--api-key-file``, ``BATCHSERVE_API_KEY``): which routes need one,
the 401s (OpenAI's shape under /v1), the check against every key, the refusals counted, and the
keys kept out of logs, error bodies, /readyz and settings dumps.  In process, but for the start
errors (a real ``batchserve serve``); HTTPS and CORS on a real server: test_tls.py; the openai
client, the pages and the server's own output: test_auth_clients.py."""

from __future__ import annotations

import hmac
import json
import logging
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from batchserve.server import auth
from batchserve.server.auth import MESSAGES, KeyChecker, read_key_file
from batchserve.settings import API_KEY_ENV, SETTINGS_ENV, Settings
from tests.conftest import ROOT

KEY, OTHER_KEY = "key-one-0123456789abcdef", "key-two-abcdef0123456789"
WRONG = "not-a-key-fedcba9876543210"
ECHO = "tests.fakes:echo"

#: (method, path, status with a key): a route that does not exist is refused too, before routing
NEEDS_KEY = [
    ("GET", "/v1/models", 200),
    ("POST", "/models/echo/predict", 200),
    ("GET", "/metrics", 200),
    ("GET", "/dashboard/stats", 200),
    ("GET", "/docs", 200),
    ("GET", "/openapi.json", 200),
    ("GET", "/nowhere", 404),
]
#: probes, and the pages (static, no data) a browser opens before it can ask for the key
PUBLIC = ["/healthz", "/readyz", "/dashboard", "/web/apikey.js"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def refused_counts(metrics_text: str) -> dict[str, float]:
    found = re.findall(r'^batchserve_auth_refused_total\{reason="(\w+)"\} (\S+)$', metrics_text, re.MULTILINE)
    return {reason: float(value) for reason, value in found}


@pytest.fixture
async def keyed(serve_app):
    return await serve_app(models=[ECHO], api_keys=[KEY, OTHER_KEY])


async def test_every_route_but_the_public_ones_needs_a_key(keyed):
    for method, path, status in NEEDS_KEY:
        body = {"inputs": [1]} if method == "POST" else None
        assert (await keyed.request(method, path, json=body)).status_code == 401, path
        assert (await keyed.request(method, path, json=body, headers=bearer(WRONG))).status_code == 401, path
        for key in (KEY, OTHER_KEY):
            assert (await keyed.request(method, path, json=body, headers=bearer(key))).status_code == status, path
    for path in PUBLIC:
        assert (await keyed.get(path)).status_code == 200, path
    assert (await keyed.post("/models/echo/predict", json={"inputs": [7]}, headers=bearer(KEY))).json() == {"outputs": [7]}


async def test_refusals_in_each_routes_shape_with_a_bearer_challenge(keyed):
    missing = await keyed.get("/v1/models")
    assert missing.json() == {
        "error": {"message": MESSAGES["missing"], "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    }
    assert missing.headers["www-authenticate"] == 'Bearer realm="batchserve"'
    wrong = await keyed.post("/v1/embeddings", json={"input": "x"}, headers=bearer(WRONG))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert wrong.json()["error"]["message"] == MESSAGES["invalid"]
    assert wrong.headers["www-authenticate"] == 'Bearer realm="batchserve", error="invalid_token"'
    house = await keyed.post("/models/echo/predict", json={"inputs": [1]}, headers=bearer(WRONG))
    assert house.json() == {"error": {"message": MESSAGES["invalid"], "type": "invalid_api_key"}}
    # the scheme is case-insensitive; another scheme, or Bearer without a token, is no key
    assert (await keyed.get("/v1/models", headers={"Authorization": f"bearer {KEY}"})).status_code == 200
    for header in (f"Basic {KEY}", "Bearer", "Bearer ", KEY):
        refused = await keyed.get("/v1/models", headers={"Authorization": header})
        assert refused.status_code == 401 and refused.json()["error"]["message"] == MESSAGES["missing"], header


async def test_refusals_are_counted_by_reason(keyed):
    before = refused_counts((await keyed.get("/metrics", headers=bearer(KEY))).text)
    assert before == {"missing": 0.0, "invalid": 0.0}  # both there from the start
    await keyed.get("/v1/models")
    for _ in range(2):
        await keyed.post("/models/echo/predict", json={"inputs": [1]}, headers=bearer(WRONG))
    await keyed.get("/healthz")  # public: nothing refused
    after = refused_counts((await keyed.get("/metrics", headers=bearer(KEY))).text)
    assert after == {"missing": 1.0, "invalid": 2.0}


async def test_public_metrics_opens_metrics_only(serve_app):
    client = await serve_app(models=[ECHO], api_keys=[KEY], public_metrics=True)
    assert "batchserve_auth_refused_total" in (await client.get("/metrics")).text
    for path in ("/dashboard/stats", "/v1/models"):
        assert (await client.get(path)).status_code == 401, path


async def test_without_keys_the_server_is_open_as_before(serve_app):
    client = await serve_app(models=[ECHO])
    assert (await client.get("/v1/models")).status_code == 200
    assert (await client.post("/models/echo/predict", json={"inputs": [1]})).json() == {"outputs": [1]}
    metrics = (await client.get("/metrics")).text
    assert "batchserve_auth_refused" not in metrics
    # and no CORS answer without --cors-origins
    assert "access-control-allow-origin" not in (await client.get("/v1/models", headers={"Origin": "https://a.test"})).headers


def test_the_check_compares_with_every_key_whichever_matches(monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append((len(a), len(b))) or real(a, b))
    keys = [f"key-{i:02d}-{'x' * i}" for i in range(10)]
    check = KeyChecker(keys)
    for presented, expected in [(keys[0], True), (keys[9], True), ("nope", False), (keys[0] + "x", False), ("", False)]:
        compared.clear()
        assert check(presented.encode()) is expected, presented
        assert len(compared) == len(keys)  # no early exit: every key, first match or none
        assert set(compared) == {(32, 32)}  # digests: the same length whatever the keys' lengths
    assert "key-0" not in repr(check)


def test_key_file_one_a_line_with_comment_lines_and_blanks(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# staging keys\n\n  {KEY}  \n#{WRONG}\n{OTHER_KEY}#2026\n\n")
    assert read_key_file(str(path)) == [KEY, f"{OTHER_KEY}#2026"]  # a # after the start is part of the key


def serve_exits(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``batchserve serve`` that should refuse to start: its exit status and output."""
    command = [sys.executable, "-m", "batchserve.cli", "serve", "--model", ECHO, *args]
    return subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_a_missing_empty_or_bad_key_file_stops_the_start(tmp_path):
    missing = serve_exits("--api-key-file", str(tmp_path / "absent"))
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip() == f"batchserve: --api-key-file {tmp_path / 'absent'}: cannot read it: No such file or directory"

    comments_only = tmp_path / "empty"
    comments_only.write_text("# no key yet\n\n")
    empty = serve_exits("--api-key-file", str(comments_only))
    assert empty.returncode == 2 and "holds no key" in empty.stderr, empty.stderr

    bad = tmp_path / "bad"
    bad.write_text(f"{KEY}\n# next: pasted with a space\nsecret part two\n")
    refused = serve_exits("--api-key-file", str(bad))
    assert refused.returncode == 2, refused.stderr
    assert f"--api-key-file {bad}, line 3: only printable ASCII without spaces" in refused.stderr
    assert "secret" not in refused.stderr and KEY not in refused.stderr and "Traceback" not in refused.stderr


def test_a_bad_key_flag_is_refused_without_showing_it():
    refused = serve_exits("--api-key", "my secret", "--api-key", "é-secret")
    assert refused.returncode == 2 and "API key 1" in refused.stderr, refused.stderr
    assert "secret" not in refused.stderr


def test_keys_from_the_environment_separated_by_spaces(monkeypatch):
    from batchserve import cli

    given: list[Settings] = []
    monkeypatch.setattr(cli, "run_server", given.append)
    runner = CliRunner()
    assert runner.invoke(cli.app, ["serve", "--model", ECHO], env={API_KEY_ENV: f" {KEY}  {OTHER_KEY} "}).exit_code == 0
    assert runner.invoke(cli.app, ["serve", "--model", ECHO, "--api-key", WRONG], env={API_KEY_ENV: KEY}).exit_code == 0
    keys = [[key.get_secret_value() for key in settings.server.api_keys] for settings in given]
    assert keys == [[KEY, OTHER_KEY], [WRONG]]  # a flag wins over the environment, as every flag does


def test_keys_reach_gunicorn_apart_from_the_settings_json(monkeypatch):
    monkeypatch.setenv(SETTINGS_ENV, "")
    monkeypatch.setenv(API_KEY_ENV, "")
    settings = Settings.from_options(models=[ECHO], api_keys=[KEY, OTHER_KEY], port=9123)
    settings.to_env()  # what `serve --http-workers N` hands the gunicorn master
    import os

    assert KEY not in os.environ[SETTINGS_ENV] and "api_keys" not in os.environ[SETTINGS_ENV]
    assert os.environ[API_KEY_ENV] == f"{KEY} {OTHER_KEY}"
    back = Settings.from_env()
    assert [key.get_secret_value() for key in back.server.api_keys] == [KEY, OTHER_KEY] and back.server.port == 9123
    # gunicorn run by hand: keys in BATCHSERVE_API_KEY beside the settings
    monkeypatch.setenv(SETTINGS_ENV, json.dumps({"server": {"port": 9124}}))
    monkeypatch.setenv(API_KEY_ENV, OTHER_KEY)
    assert [key.get_secret_value() for key in Settings.from_env().server.api_keys] == [OTHER_KEY]


async def test_keys_are_in_no_log_error_body_readyz_or_dump(serve_app, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    key_file = tmp_path / "keys"
    key_file.write_text(f"{OTHER_KEY}\n")
    settings = Settings.from_options(models=[ECHO], api_keys=[KEY], api_key_file=str(key_file))
    dumps = [repr(settings), str(settings), settings.model_dump_json(), json.dumps(settings.model_dump(mode="json"))]
    client = await serve_app(settings)
    answers = [
        await client.get("/readyz"),
        await client.get("/v1/models"),
        await client.get("/v1/models", headers=bearer(WRONG)),
        await client.post("/models/echo/predict", json={"inputs": [1]}, headers=bearer(WRONG)),
        await client.post("/models/echo/predict", json={"inputs": [KEY]}, headers=bearer(OTHER_KEY)),  # the file's key works
        await client.get("/metrics", headers=bearer(KEY)),
    ]
    assert answers[-2].json() == {"outputs": [KEY]}  # (the one place a key may be: what the client sent as data)
    texts = [*dumps, caplog.text, *(answer.text for answer in answers[:-2]), answers[-1].text]
    for text in texts:
        for secret in (KEY, OTHER_KEY, WRONG):
            assert secret not in text
    assert "**********" in dumps[2]  # masked, not dropped: the dump says keys are set
