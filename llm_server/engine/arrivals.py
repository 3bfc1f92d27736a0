"""Announced arrivals: a burst of requests onto an idle engine is admitted in one step.

When several clients send at once, their requests reach the engine a few milliseconds apart (each
is parsed, rendered through the chat template and tokenized first). An idle engine would admit the
first alone and run its prefill, and the rest would wait for that whole step before theirs: at 16
concurrent on the embedded model the first request got its first token after ~90 ms and the other
fifteen after ~300 ms (two prefills back to back, the first slowed by the others' tokenizing).

So a request is announced as soon as it is known to be coming (the HTTP layer does it once its body
has arrived: ``Engine.arriving()``, an :class:`Arrival` that is done once the request is queued or
refused), and the scheduler, before admitting onto an engine
with nothing running, waits until no announced request is still being prepared
(:meth:`Arrivals.settle`), at most :data:`ARRIVAL_WAIT_S`. A lone request's own announcement ends
right after its submit, so one user waits only that long; an engine already running (or draining)
never waits (a new request joins at the next step, as before). The engine knows nothing about HTTP:
an announcement is just "a request is coming". Measured: docs/benchmarks.md (a small gain in TTFT
under bursts; the burst's prefill itself is what it waits for).
"""

from __future__ import annotations

import threading
import time

#: The longest the scheduler holds an idle engine's admission for announced requests.
ARRIVAL_WAIT_S = 0.025


class Arrival:
    """One announced request; :meth:`done` (idempotent) once it is queued, refused or failed.
    Also a context manager that ends it. ``Arrival(None)`` announces nothing (an engine that
    does not wait)."""

    def __init__(self, arrivals: Arrivals | None) -> None:
        self._arrivals = arrivals
        if arrivals is not None:
            arrivals.begin()

    def done(self) -> None:
        if self._arrivals is not None:
            self._arrivals.end(self)

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()


class Arrivals:
    """Requests being prepared for ``submit``, counted under the engine's condition ``lock``."""

    def __init__(self, lock: threading.Condition, wait_s: float | None = None) -> None:
        """``wait_s`` None: :data:`ARRIVAL_WAIT_S` (read now, so a test may change it)."""
        self._lock = lock
        self._wait_s = ARRIVAL_WAIT_S if wait_s is None else wait_s
        self._pending = 0

    def announce(self) -> Arrival:
        """A request is coming: counted until its :meth:`Arrival.done`."""
        return Arrival(self)

    def begin(self) -> None:
        with self._lock:
            self._pending += 1

    def end(self, arrival: Arrival) -> None:
        """``arrival`` is done (once, whichever thread calls first); the last one wakes the scheduler."""
        with self._lock:
            if arrival._arrivals is None:  # noqa: SLF001 - its own Arrivals, under the lock
                return
            arrival._arrivals = None  # noqa: SLF001
            self._pending -= 1
            if self._pending == 0:
                self._lock.notify_all()

    @property
    def pending(self) -> int:
        """Announced requests not yet done preparing."""
        return self._pending

    def settle(self, idle: bool = True) -> None:
        """With ``lock`` held, before an admission: on an ``idle`` engine, wait until no announced
        request is still being prepared, for at most the wait limit (a request that was just queued
        is done right after ``submit``). A busy engine never waits."""
        if not idle:
            return
        deadline = time.monotonic() + self._wait_s
        while self._pending > 0 and (left := deadline - time.monotonic()) > 0:
            self._lock.wait(left)


__all__ = ["ARRIVAL_WAIT_S", "Arrival", "Arrivals"]
