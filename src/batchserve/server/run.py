"""Run the app on uvicorn with a graceful drain on SIGTERM / SIGINT.

On the first signal ``/readyz`` turns 503 (so load balancers stop sending), the server
keeps serving for ``drain_seconds``, then stops accepting connections, lets in-flight
requests finish for up to ``grace`` seconds, closes the batchers and workers and exits 0.
A second SIGINT forces an immediate exit.

If a service fails to start (``app.state.stop_serving``), the server stops at once and the
process exits with status 3, the reason on stderr.  Otherwise it says on stderr, in one
plain line each, that it listens (while the models load) and that it is ready, with its URL.
"""

from __future__ import annotations

import logging
import signal
import ssl
import sys
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from batchserve.server import pages
from batchserve.server.app import CANNOT_SERVE
from batchserve.settings import ServerSettings, Settings

log = logging.getLogger("batchserve.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float):
        super().__init__(config)
        self.app = app
        self.drain_seconds = drain_seconds
        self.draining = False
        self.failure: str | None = None
        self.ready = False

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # listening now; the models may have loaded already (then one line)
            self._announce(listening=True)

    def on_ready(self) -> None:
        """Every service started (called on the loop, maybe before the socket is bound)."""
        self.ready = True
        if self.started:
            self._announce(listening=False)

    def _announce(self, listening: bool) -> None:
        server, names = self.app.state.settings.server, [service.name for service in self.app.state.services]
        if self.ready:
            pages.announce_ready(server, names)
        elif listening:
            pages.announce_listening(server, names)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's captured signals: it would re-raise them on exit,
        # and a clean drain must exit 0.
        if self.draining:
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self.draining = True
        self.app.state.draining = True
        log.warning("signal %s: draining for %.1f s, then shutting down", signal.Signals(sig).name, self.drain_seconds)
        timer = threading.Timer(self.drain_seconds, self._stop_accepting)
        timer.daemon = True
        timer.start()

    def _stop_accepting(self) -> None:
        self.should_exit = True

    def cannot_serve(self, message: str) -> None:
        """A service failed to start: stop now (nothing to drain), and exit non-zero."""
        self.failure = message
        self.app.state.draining = True
        self.should_exit = True


def check_tls(server: ServerSettings) -> None:
    """The certificate, its key and the client CA load (a ValueError naming the file and why, if not).

    uvicorn and gunicorn would fail on them only once starting, with a traceback.
    """
    if server.ssl_certfile is None:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(server.ssl_certfile, server.ssl_keyfile)
    except (OSError, ssl.SSLError) as error:
        files = server.ssl_certfile + (f" and --ssl-keyfile {server.ssl_keyfile}" if server.ssl_keyfile else "")
        raise ValueError(f"--ssl-certfile {files}: cannot load the certificate and its key: {_reason(error)}") from None
    if server.ssl_ca_certs is not None:
        try:
            context.load_verify_locations(server.ssl_ca_certs)
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"--ssl-ca-certs {server.ssl_ca_certs}: cannot load the CA certificates: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or getattr(error, "reason", None) or str(error)


def tls_options(server: ServerSettings) -> dict:
    """uvicorn's HTTPS options: the certificate and key, and with a CA, client certificates required."""
    if server.ssl_certfile is None:
        return {}
    options = {"ssl_certfile": server.ssl_certfile, "ssl_keyfile": server.ssl_keyfile}
    if server.ssl_ca_certs is not None:
        options |= {"ssl_ca_certs": server.ssl_ca_certs, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def serve(app: FastAPI, settings: Settings, log_config: dict) -> None:
    server = settings.server
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        loop="auto",
        http="auto",
        log_config=log_config,
        log_level=server.log_level.value,
        access_log=False,
        timeout_graceful_shutdown=server.grace,
        **tls_options(server),
    )
    runner = DrainingServer(config, app, server.drain_seconds)
    app.state.stop_serving = runner.cannot_serve
    app.state.on_ready = runner.on_ready
    runner.run()
    if runner.failure is not None:
        print(f"batchserve: cannot serve: {runner.failure}", file=sys.stderr, flush=True)
        raise SystemExit(CANNOT_SERVE)
