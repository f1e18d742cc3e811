"""gunicorn config for batchserve: several HTTP processes sharing one copy of the models.

``batchserve serve --http-workers N ...`` runs exactly this configuration.  To run gunicorn
yourself, give it the server's settings, as a config file (the one ``serve --config`` reads),
as JSON (the same names, flat or in their groups), or both (the JSON wins), and this file::

    BATCHSERVE_SETTINGS='{"host": "0.0.0.0", "port": 8000, "http_workers": 4}' \\
        gunicorn -c deploy/gunicorn.conf.py
    BATCHSERVE_CONFIG=batchserve.yaml gunicorn -c deploy/gunicorn.conf.py

What it sets (see ``batchserve/server/gunicorn_config.py`` for the reasons):

==========================  ==============================================================
``wsgi_app``                ``batchserve.server.app:create_preloaded_app()``
``preload_app = True``      the master loads the models once; workers share them by fork
``when_ready``/``pre_fork`` ``gc.collect()`` + ``gc.freeze()`` before forking
``worker_class``            ``ServingWorker`` (uvicorn's worker; exits with the boot error
                            when its services cannot start, so the master halts)
``on_starting``             the master halts once: another worker's boot error while it
                            halts is reaped quietly (gunicorn would raise it, exit 1)
``timeout = 300``           long enough for a worker to start its models
``max_requests``            10 000 with a jitter of 1 000: workers recycle one at a time
``post_fork``               threads per worker = cores // workers, every runtime
``certfile``, ``keyfile``   HTTPS, from ``ssl_certfile``/``ssl_keyfile``; with ``ssl_ca_certs``,
                            ``ca_certs`` and ``cert_reqs`` (client certificates required)
==========================  ==============================================================

API keys: ``BATCHSERVE_API_KEY`` in the environment (several separated by spaces), or
``"api_key_file"`` in the settings (docs/security.md).

Override any of them below, after the import.
"""

from batchserve.server.gunicorn_config import *  # noqa: F401,F403

# Examples:
# workers = 4
# max_requests = 50_000
