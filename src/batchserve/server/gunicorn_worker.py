"""The gunicorn worker of ``batchserve serve --http-workers N``: uvicorn's, plus an exit that
stops the whole server when a service fails to start.

Such a worker stops serving and exits with gunicorn's ``WORKER_BOOT_ERROR`` (3); the master
then stops every worker and exits with status 3 too ("Worker failed to boot"), instead of
replacing the worker forever.
"""

from __future__ import annotations

import sys

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker


class ServingWorker(UvicornWorker):
    async def _serve(self) -> None:  # UvicornWorker._serve, with app.state.stop_serving set
        self.config.app = self.wsgi
        server = Server(config=self.config)
        failures: list[str] = []

        def cannot_serve(message: str) -> None:
            failures.append(message)
            server.should_exit = True

        self.wsgi.state.stop_serving = cannot_serve
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if failures:
            print(f"batchserve: cannot serve: {failures[0]}", file=sys.stderr, flush=True)
        if failures or not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
