"""Admission by expected wait: queue what the engine can start within a bound, refuse the rest.

A fixed queue length (``max_waiting``) refuses a burst that would drain in seconds, and admits
a queue of long requests that would wait for minutes. Instead, :meth:`Admission.check` (called
by ``BatchEngine.submit`` under the engine lock) estimates how long a new request would wait
before it starts, and refuses it (:class:`EngineOverloaded`, HTTP 503 with ``Retry-After`` set
from the estimate) only when that is over ``max_queue_wait_s`` (default 30 s).

The estimate replays the FIFO on the batch's slots. The number of slots is ``max_running``,
lowered by the KV budget (``max_total_tokens`` / the longest reservation). Each running request
holds its slot for the tokens it still may generate, each waiting one for its prompt's prefill
chunks and all of its ``max_new_tokens``. The new request starts when the slot it needs frees,
after that many decode steps, times the measured seconds per step (a moving average of the
scheduler's working iterations, :meth:`Admission.record_step`, fitted as a function of the batch
size by :class:`StepTimeModel`, and taken at the batch size the queue will keep). Using ``max_new_tokens`` makes it
an upper bound (answers often stop sooner), so a refusal means the server really is busy. Until a
step has been measured nothing is refused on time; ``max_waiting`` remains a hard cap on the
queue's length (memory), whatever the estimate.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections.abc import Iterable
from typing import Protocol

from llm_server.engine.config import EngineConfig
from llm_server.engine.types import ContextLengthExceeded, EngineOverloaded, GenerationRequest, InvalidRequest

#: Weight of the newest step in the moving averages of step times.
_SMOOTHING = 0.2


class Queued(Protocol):
    """What the estimate needs of a sequence (``engine.sequence.Sequence`` has it)."""

    reserved: int
    prefilled: int

    @property
    def prompt_len(self) -> int: ...

    @property
    def generated(self) -> list[int]: ...


def _new_tokens(seq: Queued) -> int:
    return max(1, seq.reserved - seq.prompt_len)


class StepTimeModel:
    """Seconds per scheduler step as a function of the sequences in it: ``t = a + b * rows``, a
    least-squares fit with exponential forgetting (recent steps count most). While only one batch
    size has been seen, the slope is unknown and is assumed proportional (pessimistic)."""

    def __init__(self, decay: float = 1 - _SMOOTHING / 4) -> None:
        self._decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    @property
    def measured(self) -> bool:
        return self._w > 0

    def add(self, seconds: float, rows: int) -> None:
        d, x = self._decay, float(max(1, rows))
        self._w, self._x, self._y = d * self._w + 1, d * self._x + x, d * self._y + seconds
        self._xx, self._xy = d * self._xx + x * x, d * self._xy + x * seconds

    def predict(self, rows: int) -> float:
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mean_x * mean_x
        if var < 0.25:  # one batch size so far: grow in proportion above it
            return mean_y * max(1.0, rows / mean_x)
        slope = max(0.0, (self._xy / self._w - mean_x * mean_y) / var)
        return max(1e-6, mean_y + slope * (rows - mean_x))


class Admission:
    """Expected-wait admission for one engine (thread-safe: submit threads and the scheduler)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._steps = StepTimeModel()

    def record_step(self, seconds: float, rows: int = 1) -> None:
        """One working scheduler iteration over ``rows`` sequences (prefilling and decoding) took ``seconds``."""
        with self._lock:
            self._steps.add(seconds, rows)

    def step_s(self, rows: int) -> float | None:
        """Expected seconds of a step over ``rows`` sequences (None before any step was measured)."""
        with self._lock:
            return self._steps.predict(rows) if self._steps.measured else None

    def wait_steps(self, running: Iterable[Queued], waiting: Iterable[Queued], new_reserved: int) -> int:
        """Scheduler steps before a new request (``new_reserved`` = prompt + max_new_tokens) would start."""
        running, waiting = list(running), list(waiting)
        longest = max([new_reserved, *(s.reserved for s in running), *(s.reserved for s in waiting)])
        slots = max(1, min(self.config.max_running, self.config.max_total_tokens // max(1, longest)))
        chunk = self.config.prefill_tokens_beside(len(running))  # a step's prompt tokens beside the decodes
        frees = [max(0, _new_tokens(s) - len(s.generated)) + math.ceil(max(0, s.prompt_len - s.prefilled) / chunk)
                 for s in running]
        heap = sorted(frees)[-slots:] if len(frees) > slots else frees + [0] * (slots - len(frees))
        heapq.heapify(heap)
        for seq in waiting:
            start = heapq.heappop(heap)
            heapq.heappush(heap, start + math.ceil(seq.prompt_len / chunk) + _new_tokens(seq))
        return heapq.heappop(heap)

    def expected_wait_s(self, running: Iterable[Queued], waiting: Iterable[Queued], new_reserved: int) -> float:
        """Seconds a new request would wait (0 until a step has been measured): the steps before
        it starts, each as long as a step over the batch the queue keeps full."""
        running, waiting = list(running), list(waiting)
        longest = max([new_reserved, *(s.reserved for s in running), *(s.reserved for s in waiting)])
        busy = min(len(running) + len(waiting) + 1, self.config.max_running,
                   max(1, self.config.max_total_tokens // max(1, longest)))
        step_s = self.step_s(busy)
        if step_s is None:
            return 0.0
        return self.wait_steps(running, waiting, new_reserved) * step_s

    def check(self, running: Iterable[Queued], waiting: list[Queued], new_reserved: int) -> None:
        """Raise :class:`EngineOverloaded` if a new request would wait too long (or the queue is full)."""
        if len(waiting) >= self.config.max_waiting:
            raise EngineOverloaded(f"server is overloaded: {len(waiting)} requests are queued (the most)",
                                   retry_after_s=self.config.retry_after_s)
        wait_s = self.expected_wait_s(running, waiting, new_reserved)
        bound = self.config.max_queue_wait_s
        if wait_s > bound:
            retry = max(self.config.retry_after_s, math.ceil(wait_s - bound))
            raise EngineOverloaded(f"server is overloaded: a new request would wait about {wait_s:.0f} s to start "
                                   f"(the limit is {bound:g} s)", retry_after_s=retry)


def validate_request(request: GenerationRequest, vocab_size: int, max_context: int) -> None:
    """Reject a malformed request at submit (InvalidRequest / ContextLengthExceeded: HTTP 400)."""
    ids = request.prompt_ids
    if not ids:
        raise InvalidRequest("the prompt is empty: at least one token is needed")
    bias = [i for i, _ in request.params.logit_bias]
    for what, checked in (("prompt", ids), ("logit_bias", bias), ("prediction", request.prediction or ())):
        bad = next((i for i in checked if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"{what} token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    new_tokens = max(request.params.max_new_tokens, 0)
    if len(ids) + new_tokens > max_context:
        raise ContextLengthExceeded(len(ids), new_tokens, max_context)
