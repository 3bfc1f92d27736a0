"""Prometheus metrics of generation, and the per-request observer that feeds them.

The metric objects live in prometheus-client's default registry (one per process, as
Prometheus expects), so ``/metrics`` also carries the standard ``process_*`` and
``python_*`` series. Names follow Prometheus conventions: a ``llm_server_`` prefix, base
units (seconds), ``_total`` on counters.

Per-request latency and token counts are recorded by :class:`RequestMetrics`, a
:class:`~llm_server.serving.turn_stream.StreamObserver` that a
:class:`~llm_server.serving.turn_stream.TurnStream` calls as its text is delivered and once
when it ends. Queue gauges are set from
``engine.stats()`` at scrape time by :func:`update_engine_gauges`. Nothing here knows HTTP.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from llm_server.engine.types import EngineStats

PREFIX = "llm_server"

# The "*_created" timestamp series only add noise to every scrape (vLLM drops them too).
disable_created_metrics()

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

TIME_TO_FIRST_TOKEN = Histogram(
    f"{PREFIX}_time_to_first_token_seconds",
    "Time from request arrival to the first generated text.",
    buckets=_TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    f"{PREFIX}_inter_token_latency_seconds",
    "Time between consecutive streamed text deltas of one request.",
    buckets=_ITL_BUCKETS,
)
E2E_REQUEST_LATENCY = Histogram(
    f"{PREFIX}_e2e_request_latency_seconds",
    "Time from request arrival to the end of its generation.",
    buckets=_E2E_BUCKETS,
)
PROMPT_TOKENS = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed (summed over improvement passes).")
GENERATION_TOKENS = Counter(f"{PREFIX}_generation_tokens", "Tokens generated (summed over improvement passes).")
GENERATIONS_FINISHED = Counter(
    f"{PREFIX}_generations_finished",
    "Generations that ended, by reason: stop, length, cancelled (client gone) or error.",
    ["finish_reason"],
)
QUEUE_TIME = Histogram(
    f"{PREFIX}_request_queue_time_seconds",
    "Time a generation pass waited in the engine's queue before it started.",
    buckets=_TTFT_BUCKETS,
)
EXPECTED_QUEUE_WAIT = Gauge(f"{PREFIX}_expected_queue_wait_seconds",
                            "Seconds a new request is expected to wait before it starts (admission's estimate).")
REQUESTS_WAITING = Gauge(f"{PREFIX}_requests_waiting", "Requests queued in the engine, not yet running.")
REQUESTS_RUNNING = Gauge(f"{PREFIX}_requests_running", "Requests the engine is generating for now.")
ENGINE_HEALTHY = Gauge(f"{PREFIX}_engine_healthy", "1 when the engine is ready and healthy, else 0.")
PREFIX_CACHE_QUERIES = Counter(f"{PREFIX}_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
PREFIX_CACHE_HITS = Counter(f"{PREFIX}_prefix_cache_hits", "Prompt tokens served from the prefix cache.")
PREFIX_CACHE_TOKENS = Gauge(f"{PREFIX}_prefix_cache_tokens", "Tokens of KV the prefix cache holds now.")
SPEC_DRAFT_TOKENS = Counter(f"{PREFIX}_spec_decode_num_draft_tokens", "Speculative decoding: draft tokens proposed.")
SPEC_ACCEPTED_TOKENS = Counter(f"{PREFIX}_spec_decode_num_accepted_tokens",
                               "Speculative decoding: draft tokens the model accepted.")
SPEC_FORCED_TOKENS = Counter(f"{PREFIX}_spec_decode_num_forced_tokens",
                             "Speculative decoding: grammar-forced tokens verified in one step with others.")
# the engine's cumulative values already added to the counters
_counted = {"queries": 0, "hits": 0, "drafted": 0, "accepted": 0, "forced": 0}


def _count_prefix_cache(stats: EngineStats) -> None:
    """Advance the prefix-cache counters to the engine's cumulative values (a new engine restarts them)."""
    for key, counter, total in (("queries", PREFIX_CACHE_QUERIES, stats.prefix_cache_queries),
                                ("hits", PREFIX_CACHE_HITS, stats.prefix_cache_hits),
                                ("drafted", SPEC_DRAFT_TOKENS, stats.spec_draft_tokens),
                                ("accepted", SPEC_ACCEPTED_TOKENS, stats.spec_accepted_tokens),
                                ("forced", SPEC_FORCED_TOKENS, stats.spec_forced_tokens)):
        if total < _counted[key]:
            _counted[key] = 0
        if total > _counted[key]:
            counter.inc(total - _counted[key])
            _counted[key] = total
    PREFIX_CACHE_TOKENS.set(stats.prefix_cache_tokens)


def update_engine_gauges(stats: EngineStats | None) -> None:
    """Copy an engine snapshot into the queue gauges (called just before each scrape)."""
    if stats is None:
        REQUESTS_WAITING.set(0)
        REQUESTS_RUNNING.set(0)
        EXPECTED_QUEUE_WAIT.set(0)
        ENGINE_HEALTHY.set(0)
        return
    REQUESTS_WAITING.set(stats.waiting)
    REQUESTS_RUNNING.set(stats.running)
    EXPECTED_QUEUE_WAIT.set(stats.expected_wait_s)
    ENGINE_HEALTHY.set(1 if stats.healthy and stats.ready else 0)
    _count_prefix_cache(stats)


class RequestMetrics:
    """Records one request's TTFT, inter-token latency, e2e latency, token counts and end reason.

    ``started_at`` is the request's arrival on the ``time.perf_counter()`` clock; default: now.
    """

    def __init__(self, started_at: float | None = None) -> None:
        self.started_at = time.perf_counter() if started_at is None else started_at
        self._last_text_at: float | None = None
        self._finished = False

    def on_text(self) -> None:
        """Time a non-empty delta: time to first token for the first, inter-token latency after."""
        now = time.perf_counter()
        if self._last_text_at is None:
            TIME_TO_FIRST_TOKEN.observe(now - self.started_at)
        else:
            INTER_TOKEN_LATENCY.observe(now - self._last_text_at)
        self._last_text_at = now

    def on_queued(self, seconds: float) -> None:
        """A pass waited ``seconds`` in the engine's queue before it started."""
        QUEUE_TIME.observe(max(0.0, seconds))

    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        """The end (counted once): stop, length, cancelled or error, with the tokens it used."""
        if self._finished:
            return
        self._finished = True
        PROMPT_TOKENS.inc(max(prompt_tokens, 0))
        GENERATION_TOKENS.inc(max(completion_tokens, 0))
        E2E_REQUEST_LATENCY.observe(time.perf_counter() - self.started_at)
        GENERATIONS_FINISHED.labels(finish_reason=reason).inc()
