"""Fill the image's cache directory at build time: ``python deploy/warm-caches.py APP ...``.

Starts ``batchserve serve --app APP`` on loopback once per app, waits for ``/readyz``, then
stops it with SIGTERM and requires exit 0.  Whatever an app builds on its first start (the
generation model's safetensors copy of the GGUF, an exported encoder) is then in the cache
directory, and containers start from it in seconds.  It goes through the command line only, so
it keeps working when the modules that build those caches move.  One app per process: two
models loading at once in one process can collide (see the report of issue 14).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

READY_TIMEOUT = 1800.0  # seconds: a dequantization on a loaded 2-core builder takes minutes
STOP_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def warm(app: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["batchserve", "serve", "--app", app, "--host", "127.0.0.1", "--port", str(port), "--drain-seconds", "0"]
    started = time.monotonic()
    server = subprocess.Popen(command)
    try:
        while not ready(url):
            if server.poll() is not None:
                sys.exit(f"warm-caches: `{' '.join(command)}` exited {server.returncode} before it was ready")
            if time.monotonic() - started > READY_TIMEOUT:
                sys.exit(f"warm-caches: `{' '.join(command)}` not ready in {READY_TIMEOUT:.0f} s")
            time.sleep(0.5)
        print(f"warm-caches: --app {app} ready in {time.monotonic() - started:.1f} s", flush=True)
        server.send_signal(signal.SIGTERM)
        code = server.wait(STOP_TIMEOUT)
        if code != 0:
            sys.exit(f"warm-caches: --app {app} exited {code} after SIGTERM")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def cache_dir() -> Path:
    explicit = os.environ.get("BATCHSERVE_CACHE_DIR")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(explicit) if explicit else Path(base) / "batchserve"


def main() -> None:
    apps = sys.argv[1:] or ["embeddings", "generation"]
    for app in apps:
        warm(app)
    root = cache_dir()
    entries = sorted(str(path.relative_to(root)) for path in root.glob("*/*")) if root.is_dir() else []
    size = sum(path.stat().st_size for path in root.rglob("*") if path.is_file()) if root.is_dir() else 0
    print(f"warm-caches: {root}: {size / 2**20:.0f} MiB in {entries or 'nothing'}", flush=True)


if __name__ == "__main__":
    main()
