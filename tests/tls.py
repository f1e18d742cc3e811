"""Throwaway certificates for TLS tests, made with the openssl command line.

:func:`make_pki` makes a certificate authority, a server certificate it signs (for
``localhost`` and ``127.0.0.1``), a client certificate it signs, and a second, unrelated
authority (whose trust must not be enough).  EC P-256 keys: quick to make, valid one day.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pki:
    ca: Path  # the authority's certificate: what clients (and the server, for client certificates) trust
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an authority that signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    finished = subprocess.run(["openssl", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=60)
    if finished.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{finished.stderr}")


def _authority(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
        "-keyout", key.name, "-out", cert.name, "-subj", f"/CN=batchserve test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    return cert, key


def _signed(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, request, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key.name, "-out", request.name, "-subj", f"/CN={name}", cwd=directory,
    )
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", request.name, "-CA", ca[0].name, "-CAkey", ca[1].name, "-CAcreateserial",
        "-days", "1", "-out", cert.name, "-extfile", f"{name}.ext", cwd=directory,
    )
    return cert, key


def make_pki(directory: Path) -> Pki:
    """Every file in ``directory``; see the module's docstring."""
    if shutil.which("openssl") is None:
        pytest.fail("no openssl command: apt-get install openssl (make system-deps)")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _authority(directory, "ca")
    server = _signed(
        directory, "localhost", ca,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    client = _signed(
        directory, "client", ca, "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    )
    other_ca, _ = _authority(directory, "other-ca")
    return Pki(ca[0], server[0], server[1], client[0], client[1], other_ca)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """A :class:`Pki` for the test module."""
    return make_pki(tmp_path_factory.mktemp("pki"))
