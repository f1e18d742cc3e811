"""Online and offline work: which requests wait behind which.

A request is *online* (a client is waiting for it) unless it was submitted inside
:func:`offline`: a batch job marks everything it submits, and the layers below read the mark
where the work is queued, so no route or service passes a parameter along::

    from batchserve.priority import offline

    with offline():
        vectors = await batcher.submit(texts)   # waits behind online requests

* :class:`~batchserve.batching.Batcher` queues offline requests in a lane of their own: a batch
  takes online items first and fills the rest with offline ones, and offline items never make
  an online request find the queue full.
* :class:`~batchserve.generation.engine.GenerationEngine` gives free rows to waiting online
  requests before waiting offline ones.
* The Redis front sends a batch of offline items only to the model's offline stream, which
  workers read only when the request stream has nothing for them (docs/scaling.md).
* The mark is a :class:`contextvars.ContextVar`: it follows the code inside the ``with`` block,
  the tasks it creates (asyncio copies the context into each new task) and calls it makes with
  :func:`asyncio.to_thread`; a plain thread started inside it does not inherit it.

The module is at the bottom of the layers (it imports nothing of batchserve): the batcher, the
engine and the backends all read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_offline: ContextVar[bool] = ContextVar("batchserve_offline", default=False)


@contextlib.contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """Mark the work submitted inside the block as offline (``offline(False)``: as online again)."""
    token = _offline.set(enabled)
    try:
        yield
    finally:
        _offline.reset(token)


def is_offline() -> bool:
    """Whether work submitted here now is offline (inside :func:`offline`)."""
    return _offline.get()
