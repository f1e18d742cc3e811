"""``from batchserve.service_streamer import ...``: the same names as :mod:`batchserve.compat`.

For code written against ShannonAI service-streamer: change ``from service_streamer`` to
``from batchserve.service_streamer`` and nothing else.
"""

from __future__ import annotations

from typing import Any

from batchserve import compat
from batchserve.compat import (  # noqa: F401 - re-exported (__all__ is compat's)
    ManagedModel,
    Streamer,
    StreamerFuture,
    ThreadedStreamer,
)

__all__ = compat.__all__


def __getattr__(name: str) -> Any:
    return getattr(compat, name)  # the Redis names, imported on first use (the redis extra)
