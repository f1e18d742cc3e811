"""What crosses the network, and what the server exposes (README "Security")."""

from __future__ import annotations

import base64
import pickle

import pytest

from batchserve.settings import Settings


class Exploit:
    """Unpickling this object would create ``marker``: proof that a payload was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_binds_to_loopback_unless_told_otherwise():
    assert Settings().server.host == "127.0.0.1"
    from typer.testing import CliRunner

    from batchserve.cli import app

    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "127.0.0.1" in help_text


async def test_docs_and_metrics_can_be_turned_off(serve_app):
    # the flags themselves: tests/test_cli.py::test_docs_and_metrics_can_be_turned_off
    client = await serve_app(models=["tests.fakes:echo"], docs=False, metrics=False)
    for path in ("/docs", "/openapi.json", "/metrics", "/dashboard", "/dashboard/stats"):
        assert (await client.get(path)).status_code == 404, path
    assert (await client.post("/models/echo/predict", json={"inputs": [1]})).json() == {"outputs": [1]}


async def test_pickle_payloads_over_http_are_never_loaded(serve_app, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Exploit(str(marker)))
    client = await serve_app(models=["tests.fakes:echo"], max_body_bytes=100000)
    for path in ("/models/echo/predict", "/v1/embeddings"):
        for content_type in ("application/octet-stream", "application/python-pickle", "application/json"):
            reply = await client.post(path, content=payload, headers={"content-type": content_type})
            assert 400 <= reply.status_code < 500, (path, content_type, reply.status_code)
    as_text = base64.b64encode(payload).decode()
    echoed = (await client.post("/models/echo/predict", json={"inputs": [as_text]})).json()
    assert echoed == {"outputs": [as_text]}  # data stays data
    assert not marker.exists()


NETWORK_MODULES = ["batchserve.wire"] + [f"batchserve.backends.redis.{name}" for name in ("protocol", "connection", "front", "worker")]


@pytest.mark.parametrize("module", NETWORK_MODULES)
def test_network_modules_do_not_use_pickle(module):
    import importlib
    import inspect

    source = inspect.getsource(importlib.import_module(module))
    assert "import pickle" not in source and "pickle.loads" not in source
    assert "allow_pickle=True" not in source
