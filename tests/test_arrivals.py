"""Announced arrivals (engine/arrivals.py, api/plumbing/arrivals.py): a burst of requests onto an idle
engine is admitted in one step, a lone request never waits, a forgotten announcement cannot stall the
engine, and every HTTP request's announcement ends (answered, refused or not a generation at all)."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from llm_server.engine.arrivals import Arrival, Arrivals
from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.engine.types import Finished
from tests.openai_harness import API_KEY, build_app, live_server
from tests.test_engine_batching import encode, greedy, request, running_engine


def _same_prefill(a: Finished, b: Finished) -> bool:
    """``b`` entered prefill before ``a``'s prefill step had ended (the engine admits per step)."""
    return b.timeline["prefilling"] < a.timeline["decoding"]


def test_a_burst_onto_an_idle_engine_is_admitted_in_one_step(tokenizer: Any, tiny_model: Any) -> None:
    with running_engine(tokenizer, tiny_model) as engine:
        first, second = engine.arriving(), engine.arriving()
        one = engine.submit(request("one", encode(tokenizer, "The first prompt"), greedy(4)))
        first.done()
        time.sleep(0.01)  # the second request is still being prepared: the idle engine waits for it
        two = engine.submit(request("two", encode(tokenizer, "A second prompt"), greedy(4)))
        second.done()
        a, b = one.result(), two.result()
    assert _same_prefill(a, b)  # one admission, one prefill step


def test_without_announcements_the_first_request_goes_alone(tokenizer: Any, tiny_model: Any) -> None:
    """The control for the test above: the same timing, nothing announced."""
    with running_engine(tokenizer, tiny_model) as engine:
        one = engine.submit(request("one", encode(tokenizer, "The first prompt"), greedy(4)))
        time.sleep(0.01)
        two = engine.submit(request("two", encode(tokenizer, "A second prompt"), greedy(4)))
        a, b = one.result(), two.result()
    assert not _same_prefill(a, b)


def test_a_forgotten_announcement_delays_an_idle_admission_by_the_limit_only(tokenizer: Any, tiny_model: Any) -> None:
    with running_engine(tokenizer, tiny_model) as engine:
        engine.arriving()  # never done
        started = time.monotonic()
        finished = engine.submit(request("one", encode(tokenizer, "Hello there"), greedy(2))).result()
        assert finished.reason == "length"
        assert time.monotonic() - started < 5.0  # bounded (ARRIVAL_WAIT_S), not stuck


def test_settle_waits_for_pending_arrivals_up_to_the_limit() -> None:
    lock = threading.Condition()
    arrivals = Arrivals(lock, wait_s=0.2)
    coming = arrivals.announce()
    assert arrivals.pending == 1
    threading.Timer(0.05, coming.done).start()
    started = time.monotonic()
    with lock:
        arrivals.settle()
    waited = time.monotonic() - started
    assert 0.03 < waited < 0.19 and arrivals.pending == 0  # released by done(), before the limit
    arrivals.announce()  # never done
    started = time.monotonic()
    with lock:
        arrivals.settle()
    assert 0.18 < time.monotonic() - started < 2.0 and arrivals.pending == 1
    with Arrival(arrivals) as arrival:
        assert arrivals.pending == 2
    arrival.done()  # idempotent
    assert arrivals.pending == 1
    Arrival(None).done()  # announces nothing


def test_every_http_request_ends_its_announcement(tokenizer: Any, tiny_model: Any) -> None:
    engine = BatchEngine(tokenizer, tiny_model, "tiny-llama", EngineConfig(max_running=4, max_total_tokens=4096))
    with live_server(build_app(engine)) as base:  # type: ignore[arg-type]  # a real engine, not the fake
        arrivals = engine._arrivals  # noqa: SLF001 - the count under test
        auth = {"Authorization": f"Bearer {API_KEY}"}
        chat = {"model": "tiny-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        answered = httpx.post(f"{base}/v1/chat/completions", json=chat, headers=auth, timeout=60)
        assert answered.status_code == 200 and arrivals.pending == 0
        refused = httpx.post(f"{base}/v1/chat/completions", json={**chat, "messages": "not a list"}, headers=auth)
        assert refused.status_code in (400, 422) and arrivals.pending == 0
        unauthorized = httpx.post(f"{base}/v1/chat/completions", json=chat)
        assert unauthorized.status_code == 401 and arrivals.pending == 0
        missing = httpx.post(f"{base}/v1/no-such-endpoint", json={}, headers=auth)
        assert missing.status_code == 404 and arrivals.pending == 0
        streamed = httpx.get(f"{base}/chat/stream", params={"prompt": "hi", "x_api_key": API_KEY}, timeout=60)
        assert streamed.status_code == 200 and "[[END]]" in streamed.text and arrivals.pending == 0
        assert httpx.get(f"{base}/health").status_code == 200 and arrivals.pending == 0
