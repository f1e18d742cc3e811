"""The gunicorn worker of ``batchserve serve --http-workers N``: uvicorn's, plus an exit that
stops the whole server when a service fails to start.

Such a worker stops serving and exits with gunicorn's ``WORKER_BOOT_ERROR`` (3); the master
then stops every worker and exits with status 3 too ("Worker failed to boot"), instead of
replacing the worker forever.

When every worker's services have started, the last one to get there prints the server's
"ready on URL" line, once (a counter in memory the master shares with the workers it forks).
"""

from __future__ import annotations

import multiprocessing
import sys

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from batchserve.server import pages

#: workers whose services have started; made in the master (which imports this module before
#: forking any worker), so every worker counts on the same one
_started_workers = multiprocessing.get_context("fork").Value("i", 0)


class ServingWorker(UvicornWorker):
    async def _serve(self) -> None:  # UvicornWorker._serve, with app.state.stop_serving set
        self.config.app = self.wsgi
        server = Server(config=self.config)
        failures: list[str] = []

        def cannot_serve(message: str) -> None:
            failures.append(message)
            server.should_exit = True

        self.wsgi.state.stop_serving = cannot_serve
        self.wsgi.state.on_ready = self._ready
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if failures:
            print(f"batchserve: cannot serve: {failures[0]}", file=sys.stderr, flush=True)
        if failures or not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    def _ready(self) -> None:
        with _started_workers.get_lock():
            _started_workers.value += 1
            last = _started_workers.value == self.cfg.workers  # once: replacements count past it
        if last:
            state = self.wsgi.state
            pages.announce_ready(state.settings.server, [service.name for service in state.services])
