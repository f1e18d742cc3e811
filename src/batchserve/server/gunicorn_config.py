"""gunicorn settings for several HTTP processes: ``batchserve serve --http-workers N``.

The server's settings arrive as JSON in ``BATCHSERVE_SETTINGS`` (the CLI writes it); run by
hand, gunicorn reads the config file ``BATCHSERVE_CONFIG`` names too, under that JSON
(:func:`batchserve.config.from_environment`).

* ``preload_app``: the master builds the app *and loads the models* once
  (:func:`~batchserve.server.app.create_preloaded_app`, CPU and one torch thread, so the
  fork is safe); every HTTP worker forked from it shares those weights copy-on-write.
* ``gc.freeze()`` before each fork keeps the master's objects out of the workers' garbage
  collections, which would otherwise touch (and so copy) the shared pages.
* ``timeout`` is long enough for a worker's own start-up (a process backend loads its
  models then); ``max_requests`` with jitter recycles workers one at a time.
* Each HTTP worker gets ``cores // N`` threads for the models it runs itself, for every
  runtime (torch's now, ``OMP_NUM_THREADS`` for ONNX Runtime and llama.cpp); a process
  backend in each gives its workers ``cores // (N x workers)``.
* HTTPS: ``certfile``/``keyfile`` (and ``ca_certs`` with ``cert_reqs`` for client
  certificates) from ``--ssl-*``; API keys reach the master in ``BATCHSERVE_API_KEY``, not in
  the settings' JSON (:meth:`~batchserve.settings.Settings.to_env`).
* A worker whose services cannot start exits with gunicorn's boot error and the master
  halts with status 3; when another worker fails the same way while the master is already
  halting (they load the same models, so they often fail together), gunicorn would raise
  its ``HaltServer`` out of ``halt()`` (a traceback, exit status 1): :func:`on_starting`
  has the master reap such a worker quietly instead.

``deploy/gunicorn.conf.py`` imports this module; copy and change it for your deployment.
"""

from __future__ import annotations

import gc
import ssl

from gunicorn.errors import HaltServer

from batchserve.config import from_environment_or_exit
from batchserve.devices import share_cores, threads_per_worker

_settings = from_environment_or_exit()
_server = _settings.server

wsgi_app = "batchserve.server.app:create_preloaded_app()"
bind = [f"[{_server.host}]:{_server.port}" if ":" in _server.host else f"{_server.host}:{_server.port}"]
workers = _server.http_workers
worker_class = "batchserve.server.gunicorn_worker.ServingWorker"
preload_app = True
timeout = 300  # seconds without a heartbeat before the master replaces a worker
graceful_timeout = 20  # seconds a worker gets to finish its requests on shutdown
keepalive = 5
max_requests = 10_000  # recycle an HTTP worker after this many requests...
max_requests_jitter = 1_000  # ...plus up to this many, so they do not all restart together
loglevel = _server.log_level.value
accesslog = None
control_socket_disable = True  # gunicorn 25+: no shared control socket in $HOME (several servers may run)
# HTTPS (--ssl-certfile, --ssl-keyfile; --ssl-ca-certs: client certificates required), as uvicorn alone
certfile = _server.ssl_certfile
keyfile = _server.ssl_keyfile
if _server.ssl_ca_certs is not None:
    ca_certs = _server.ssl_ca_certs
    cert_reqs = ssl.CERT_REQUIRED


def on_starting(server) -> None:
    """In the master, first: once it halts, a worker exiting with a boot error is reaped
    like any other (the master is stopping already, with the first one's status)."""
    halt, reap_workers = server.halt, server.reap_workers
    halting: list[int] = []

    def halting_halt(reason=None, exit_status=0):
        halting.append(exit_status)
        halt(reason, exit_status)

    def quiet_reap_workers():
        while True:
            try:
                return reap_workers()
            except HaltServer:
                if not halting:
                    raise  # the first failure: the master halts with its status

    server.halt, server.reap_workers = halting_halt, quiet_reap_workers


def when_ready(server) -> None:
    """In the master, after the models are loaded and before the first fork: it listens now."""
    from batchserve.server.pages import announce_listening

    gc.collect()
    gc.freeze()
    names = [app.value for app in _settings.app_names] + (["models"] if _settings.models else [])
    announce_listening(_server, names)


def pre_fork(server, worker) -> None:
    gc.freeze()  # objects the master made since (a replaced worker) stay out of collections too


def post_fork(server, worker) -> None:
    """Each HTTP worker computes on its share of the cores (every runtime: torch, ONNX Runtime, llama.cpp)."""
    share_cores(threads_per_worker(server.cfg.workers, _settings.process.threads_per_worker))
