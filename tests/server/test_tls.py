"""HTTPS (``--ssl-certfile``, ``--ssl-keyfile``, ``--ssl-ca-certs``) on a real server, on uvicorn and
on the gunicorn path, with a throwaway CA (tests/tls.py) and verification on; CORS and API keys
over it."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.tls import pki  # noqa: F401  (fixture)

KEY = "tls-test-key-0123456789"
ORIGIN = "https://app.example.test"


def https_url(server) -> str:
    return f"https://127.0.0.1:{server.port}"


def trusting(ca: Path, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """A client's TLS context: the server's certificate verified against ``ca``; ``cert``: its own certificate and key."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(*map(str, cert))
    return context


def wait_https(server, ca: Path, cert: tuple[Path, Path] | None = None, timeout: float = 120.0) -> str:
    """Wait until the server answers /readyz over HTTPS, verifying its certificate against ``ca``."""
    url = https_url(server)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.process.stdout.read().decode()}")
        try:
            if httpx.get(f"{url}/readyz", verify=trusting(ca, cert), timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no HTTPS answer from {url} in {timeout} s")


def server_args(pki, *extra: str) -> list[str]:  # noqa: F811
    return ["--model", "tests.fakes:echo", "--ssl-certfile", str(pki.server_cert), "--ssl-keyfile", str(pki.server_key), *extra]


def check_served_over_https(url: str, pki) -> None:  # noqa: F811
    """Verified HTTPS works with the key; without verification against the CA, or in plain HTTP, nothing does."""
    with httpx.Client(base_url=url, verify=trusting(pki.ca), timeout=30) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        answer = client.post("/models/echo/predict", json={"inputs": [1, 2]}, headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200 and answer.json() == {"outputs": [1, 2]}
        refused = client.post("/models/echo/predict", json={"inputs": [1]})
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/healthz", timeout=10)  # the system's authorities do not know the test CA
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/healthz", verify=trusting(pki.other_ca), timeout=10)
    plain = url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # uvicorn drops a plain-HTTP request on its TLS port
        httpx.get(f"{plain}/healthz", timeout=10)


def test_https_on_uvicorn_with_keys_and_cors(start_server, pki):  # noqa: F811
    server = start_server(*server_args(pki, "--api-key", KEY, "--cors-origins", ORIGIN), ready_timeout=None)
    url = wait_https(server, pki.ca)
    check_served_over_https(url, pki)
    with httpx.Client(base_url=url, verify=trusting(pki.ca), timeout=30) as client:
        # a browser's preflight carries no key: answered by CORS, before the key check
        preflight = client.options("/models/echo/predict", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        })
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert {"authorization", "content-type"} <= set(preflight.headers["access-control-allow-headers"].replace(" ", "").split(","))
        assert "POST" in preflight.headers["access-control-allow-methods"]
        stranger = client.options("/models/echo/predict", headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "POST"})
        assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers
        # the request itself: allowed origin named on the answer, a refusal included (its page can read the 401)
        simple = client.post("/models/echo/predict", json={"inputs": [3]}, headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
        assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == ORIGIN
        refused = client.get("/v1/models", headers={"Origin": ORIGIN})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
        assert "WWW-Authenticate" in refused.headers["access-control-expose-headers"]
        elsewhere = {"Origin": "https://evil.test", "Authorization": f"Bearer {KEY}"}
        other = client.post("/models/echo/predict", json={"inputs": [3]}, headers=elsewhere)
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_https_on_gunicorn_and_keys_reach_its_workers(start_server, pki):  # noqa: F811
    server = start_server(*server_args(pki, "--http-workers", "2", "--api-key", KEY), ready_timeout=None)
    url = wait_https(server, pki.ca)
    for _ in range(6):  # connections spread over both workers: every one knows the key
        check_served_over_https(url, pki)
    # the key travels to the gunicorn master in BATCHSERVE_API_KEY, never in the settings' JSON
    environment = dict(
        entry.split("=", 1) for entry in Path(f"/proc/{server.process.pid}/environ").read_text().split("\0") if "=" in entry
    )
    assert "BATCHSERVE_SETTINGS" in environment and KEY not in environment["BATCHSERVE_SETTINGS"]
    assert environment["BATCHSERVE_API_KEY"] == KEY


def test_client_certificates_with_ssl_ca_certs(start_server, pki):  # noqa: F811
    server = start_server(*server_args(pki, "--ssl-ca-certs", str(pki.ca)), ready_timeout=None)
    client_cert = (pki.client_cert, pki.client_key)
    url = wait_https(server, pki.ca, cert=client_cert)
    assert httpx.get(f"{url}/healthz", verify=trusting(pki.ca, client_cert), timeout=10).status_code == 200
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake is refused
        httpx.get(f"{url}/healthz", verify=trusting(pki.ca), timeout=10)
    server_as_client = (pki.server_cert, pki.server_key)  # signed by the CA, but for serverAuth only
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", verify=trusting(pki.ca, server_as_client), timeout=10)


def serve_exits(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "batchserve.cli", "serve", "--model", "tests.fakes:echo", *args]
    return subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("problem", ["missing certificate", "key of another certificate", "key without certificate", "bad CA file"])
def test_bad_tls_files_are_refused_at_start(pki, tmp_path, problem):  # noqa: F811
    args = {
        "missing certificate": ["--ssl-certfile", str(tmp_path / "nothing.pem")],
        "key of another certificate": ["--ssl-certfile", str(pki.server_cert), "--ssl-keyfile", str(pki.client_key)],
        "key without certificate": ["--ssl-keyfile", str(pki.server_key)],
        "bad CA file": ["--ssl-certfile", str(pki.server_cert), "--ssl-keyfile", str(pki.server_key),
                        "--ssl-ca-certs", str(pki.server_key)],
    }[problem]
    finished = serve_exits(*args)
    assert finished.returncode == 2, finished.stderr
    message = finished.stderr.strip()
    assert message.startswith("batchserve:") and "Traceback" not in message, message
    assert "ssl" in message, message

