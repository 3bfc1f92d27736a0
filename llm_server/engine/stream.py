"""GenerationStream: the thread-safe bridge from the scheduler thread to its consumer.

The scheduler thread ``push``es events; the consumer iterates with ``async for`` (from an
event loop) or plain ``for`` (from a worker thread). Abandoning the iteration early, or
calling :meth:`GenerationStream.cancel`, asks the scheduler to drop the request at the next
step boundary; the stream then ends with ``Finished(reason="cancelled")``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from llm_server.engine.types import Finished, StreamEvent


class GenerationStream:
    """Events of one request, in order: ``TextDelta``..., then one ``Finished`` (or an error)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._items: queue.SimpleQueue[StreamEvent | BaseException] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._finished = False

    # --- producer side (scheduler thread) -------------------------------------------------
    def push(self, item: StreamEvent | BaseException) -> None:
        """Deliver a text delta, the final ``Finished``, or an exception to raise."""
        self._items.put(item)
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """True once the consumer has gone; the scheduler drops the request at the next step."""
        return self._cancelled.is_set()

    # --- consumer side --------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the scheduler to stop generating for this request (thread-safe, idempotent)."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[StreamEvent]:
        try:
            while not self._finished:
                yield self._take(self._items.get())
        finally:
            if not self._finished:
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        self._loop = asyncio.get_running_loop()
        try:
            while not self._finished:
                item = await self._next_async()
                yield self._take(item)
        finally:
            if not self._finished:
                self.cancel()

    async def _next_async(self) -> StreamEvent | BaseException:
        while True:
            try:
                return self._items.get_nowait()
            except queue.Empty:
                self._wakeup.clear()
            try:  # re-check after clear(): a push between the two would otherwise be missed
                return self._items.get_nowait()
            except queue.Empty:
                await self._wakeup.wait()

    def _take(self, item: StreamEvent | BaseException) -> StreamEvent:
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if isinstance(item, Finished):
            self._finished = True
        return item

    # --- conveniences ---------------------------------------------------------------------
    def result(self) -> Finished:
        """Block until the request finishes; return its ``Finished`` (full text included)."""
        last: StreamEvent | None = None
        for last in self:
            pass
        assert isinstance(last, Finished)
        return last


__all__ = ["GenerationStream"]
