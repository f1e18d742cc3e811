"""Small asyncio helpers shared by the batcher, the backends, the workers and the apps."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Awaitable, Callable, Coroutine, Hashable, TypeVar

log = logging.getLogger("batchserve.aio")

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


class LoopThread:
    """An asyncio event loop running in a daemon thread of its own: how code that is not async
    (a sync caller of a :class:`~batchserve.batching.Batcher`) gets a loop to run on.

    The thread starts at once.  :meth:`submit` runs a coroutine there from any other thread
    (a ``concurrent.futures.Future``), :meth:`run` blocks for its result.  :meth:`stop` ends
    the loop as ``asyncio.run`` ends its own (every task still running there cancelled and
    awaited, async generators closed), then stops it, joins the thread and closes the loop.
    """

    def __init__(self, name: str = "batchserve-loop"):
        self.name = name
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coroutine`` on this loop; call from another thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on this loop and wait for its result (or its error)."""
        return self.submit(coroutine).result()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what still runs here, stop the loop, join the thread, close the loop.

        Idempotent; call from any thread but this loop's.  Tasks that ignore their
        cancellation for ``timeout`` s are logged and left (the loop then stays open)."""
        if self.loop.is_closed():
            return
        if self.thread.is_alive():
            try:
                self.submit(_cancel_other_tasks()).result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                log.warning("tasks on loop thread %r did not end within %g s of being cancelled", self.name, timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=timeout)
        if not self.thread.is_alive():
            self.loop.close()


async def _cancel_other_tasks() -> None:
    """Cancel every task of the running loop but this one, and wait until they end."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


class SharedWork:
    """Identical work that concurrent callers ask for, done once.

    ``await shared.run(key, make)``: the first caller with ``key`` starts ``make()``; others
    with the same key, while it runs, await the same outcome.  A caller that goes away
    (cancelled) stops waiting; the work is cancelled when its last caller has gone.  A key
    of None shares nothing.  Once the work has finished, the next caller starts it anew.
    """

    def __init__(self) -> None:
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
    def __init__(self, task: asyncio.Future[Any]):
        self.task = task
        self.callers = 0
