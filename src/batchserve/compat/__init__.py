"""ShannonAI service-streamer's names, so a service-streamer app switches with one import::

    from batchserve.compat import ThreadedStreamer, Streamer, ManagedModel
    # or, keeping the module name the code already uses:
    import batchserve.compat as service_streamer
    # or, for `from service_streamer import ...` lines:
    from batchserve.service_streamer import ThreadedStreamer

The names keep service-streamer's signatures; see :mod:`batchserve.compat.streamer` for
where the behaviour is deliberately sounder (errors reach callers, nothing hangs).

The Redis names (:mod:`batchserve.compat.redis`) are imported when first used: the local
streamers need only the core install, the Redis ones ``pip install 'batchserve[redis]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from batchserve.compat.streamer import (
    ManagedModel,
    Streamer,
    StreamerFuture,
    ThreadedStreamer,
)
from batchserve.extras import needs_extra

if TYPE_CHECKING:  # for type checkers and editors; at run time, __getattr__ below
    from batchserve.compat.redis import (
        RedisStreamer,
        RedisWorker,
        run_redis_workers_forever,
    )

#: names served by :mod:`batchserve.compat.redis`, imported on first use
REDIS_NAMES = frozenset({"RedisStreamer", "RedisWorker", "run_redis_workers_forever"})


def __getattr__(name: str) -> Any:
    if name not in REDIS_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with needs_extra("redis", f"batchserve.compat.{name}"):
        value = getattr(importlib.import_module("batchserve.compat.redis"), name)
    globals()[name] = value
    return value


#: ``from batchserve.compat import *`` takes the Redis names only where redis-py is installed
__all__ = ["ManagedModel", "Streamer", "StreamerFuture", "ThreadedStreamer"]
if importlib.util.find_spec("redis") is not None:
    __all__ += ["RedisStreamer", "RedisWorker", "run_redis_workers_forever"]
