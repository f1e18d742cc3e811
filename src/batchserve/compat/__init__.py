"""ShannonAI service-streamer's names, so a service-streamer app switches with one import::

    from batchserve.compat import ThreadedStreamer, Streamer, ManagedModel
    # or, keeping the module name the code already uses:
    import batchserve.compat as service_streamer
    # or, for `from service_streamer import ...` lines:
    from batchserve.service_streamer import ThreadedStreamer

The names keep service-streamer's signatures; see :mod:`batchserve.compat.streamer` for
where the behaviour is deliberately sounder (errors reach callers, nothing hangs).
"""

from batchserve.compat.redis import RedisStreamer, RedisWorker, run_redis_workers_forever
from batchserve.compat.streamer import ManagedModel, Streamer, StreamerFuture, ThreadedStreamer

__all__ = [
    "ManagedModel",
    "RedisStreamer",
    "RedisWorker",
    "Streamer",
    "StreamerFuture",
    "ThreadedStreamer",
    "run_redis_workers_forever",
]
