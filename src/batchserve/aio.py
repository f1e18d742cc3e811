"""Small asyncio helpers shared by the batcher, the backends, the workers and the apps."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Hashable, TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


class SharedWork:
    """Identical work that concurrent callers ask for, done once.

    ``await shared.run(key, make)``: the first caller with ``key`` starts ``make()``; others
    with the same key, while it runs, await the same outcome.  A caller that goes away
    (cancelled) stops waiting; the work is cancelled when its last caller has gone.  A key
    of None shares nothing.  Once the work has finished, the next caller starts it anew.
    """

    def __init__(self):
        self._running: dict[Hashable, _Shared] = {}

    def __len__(self) -> int:
        return len(self._running)

    async def run(self, key: Hashable | None, make: Callable[[], Awaitable[T]]) -> T:
        if key is None:
            return await make()
        shared = self._running.get(key)
        if shared is None:
            shared = _Shared(asyncio.ensure_future(make()))
            self._running[key] = shared
            shared.task.add_done_callback(lambda task: self._finished(key, shared))
        shared.callers += 1
        try:
            return await asyncio.shield(shared.task)
        finally:
            shared.callers -= 1
            if not shared.callers and not shared.task.done():
                shared.task.cancel()

    def _finished(self, key: Hashable, shared: "_Shared") -> None:
        if self._running.get(key) is shared:
            del self._running[key]
        if not shared.task.cancelled():
            shared.task.exception()  # retrieved: no "exception was never retrieved" when nobody waited


class _Shared:
    def __init__(self, task: asyncio.Future):
        self.task = task
        self.callers = 0
