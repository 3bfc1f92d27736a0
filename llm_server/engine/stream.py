"""GenerationStream: the thread-safe bridge from the scheduler thread to its consumer.

The scheduler thread ``push``es events; the consumer iterates with ``async for`` (from an
event loop) or plain ``for`` (from a worker thread). Abandoning the iteration early, or
calling :meth:`GenerationStream.cancel`, asks the scheduler to drop the request at the next
step boundary; the stream then ends with ``Finished(reason="cancelled")``.

Wake-ups are batched: a stream given a :class:`WakeupBatch` does not wake its consumer's event
loop on every push; the scheduler calls :meth:`WakeupBatch.flush` after each forward, which wakes each
event loop once (one ``call_soon_threadsafe``) for all the streams that got events in that step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from llm_server.engine.types import Finished, StreamEvent


class WakeupBatch:
    """The streams pushed to during one scheduler step, woken with one call per event loop.

    Used by one producer thread only (the scheduler's): ``defer`` during the step, ``flush`` at its end.
    """

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[GenerationStream]] = {}

    def defer(self, loop: asyncio.AbstractEventLoop, stream: GenerationStream) -> None:
        streams = self._pending.setdefault(loop, [])
        if not streams or streams[-1] is not stream:
            streams.append(stream)

    def flush(self) -> None:
        """Wake every consumer that got events since the last flush (one wake-up per loop)."""
        pending, self._pending = self._pending, {}
        for loop, streams in pending.items():
            try:
                loop.call_soon_threadsafe(_wake, streams)
            except RuntimeError:  # the consumers' loop is closed: nobody is listening
                for stream in streams:
                    stream.cancel()


def _wake(streams: list[GenerationStream]) -> None:
    for stream in streams:
        stream._wakeup.set()


class GenerationStream:
    """Events of one request, in order: ``TextDelta``..., then one ``Finished`` (or an error)."""

    def __init__(self, request_id: str, wakeups: WakeupBatch | None = None) -> None:
        self.request_id = request_id
        self._wakeups = wakeups  # None: wake the consumer on every push
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
        if loop is not None and self._wakeups is not None:
            self._wakeups.defer(loop, self)
        elif loop is not None:
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
        for event in self:
            last = event
        assert isinstance(last, Finished)
        return last


__all__ = ["GenerationStream", "WakeupBatch"]
