"""Announced arrivals (engine/arrivals.py, api/plumbing/arrivals.py): a burst of requests onto an idle
engine is admitted in one step, a lone request never waits, a forgotten announcement cannot stall the
engine, and every HTTP request's announcement ends (answered, refused or not a generation at all)."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from llm_server.engine import arrivals as arrivals_module
from llm_server.engine.arrivals import Arrival, Arrivals
from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import Finished, GenerationRequest
from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, build_app, live_server
from tests.test_engine_batching import encode, greedy, request, running_engine


def _same_prefill(a: Finished, b: Finished) -> bool:
    """``b`` entered prefill before ``a``'s prefill step had ended (the engine admits per step)."""
    return b.timeline["prefilling"] < a.timeline["decoding"]


def test_a_burst_onto_an_idle_engine_is_admitted_in_one_step(tokenizer: Any, tiny_model: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arrivals_module, "ARRIVAL_WAIT_S", 5.0)  # a slow CI machine cannot outrun the limit
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
    """The control for the test above: the second request comes once the first is running."""
    with running_engine(tokenizer, tiny_model) as engine:
        one = engine.submit(request("one", encode(tokenizer, "The first prompt"), greedy(8)))
        deadline = time.monotonic() + 30
        while engine.stats().running == 0 and engine.stats().waiting and time.monotonic() < deadline:
            time.sleep(0.001)
        two = engine.submit(request("two", encode(tokenizer, "A second prompt"), greedy(4)))
        a, b = one.result(), two.result()
    assert not _same_prefill(a, b)


def test_a_busy_engine_never_waits_for_announcements() -> None:
    lock = threading.Condition()
    arrivals = Arrivals(lock, wait_s=5.0)
    arrivals.announce()  # pending, never done
    started = time.monotonic()
    with lock:
        arrivals.settle(idle=False)
    assert time.monotonic() - started < 1.0


def test_a_forgotten_announcement_delays_an_idle_admission_by_the_limit_only(tokenizer: Any, tiny_model: Any) -> None:
    with running_engine(tokenizer, tiny_model) as engine:
        engine.arriving()  # never done
        started = time.monotonic()
        finished = engine.submit(request("one", encode(tokenizer, "Hello there"), greedy(2))).result()
        assert finished.reason == "length"
        assert time.monotonic() - started < 5.0  # bounded (ARRIVAL_WAIT_S), not stuck


def test_settle_waits_for_pending_arrivals_up_to_the_limit() -> None:
    lock = threading.Condition()
    arrivals = Arrivals(lock, wait_s=30.0)
    coming = arrivals.announce()
    assert arrivals.pending == 1
    threading.Timer(0.05, coming.done).start()
    started = time.monotonic()
    with lock:
        arrivals.settle()
    assert 0.03 < time.monotonic() - started < 20.0 and arrivals.pending == 0  # released by done(), not the limit
    bounded = Arrivals(lock, wait_s=0.2)
    bounded.announce()  # never done
    started = time.monotonic()
    with lock:
        bounded.settle()
    assert time.monotonic() - started >= 0.19 and bounded.pending == 1  # gave up at the limit (not before)
    with Arrival(bounded) as arrival:
        assert bounded.pending == 2
    arrival.done()  # idempotent
    assert bounded.pending == 1
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


class _CountingArrivals(Arrivals):
    def __init__(self) -> None:
        super().__init__(threading.Condition(), wait_s=0.0)
        self.begun = 0

    def begin(self) -> None:
        self.begun += 1
        super().begin()


class _SpyEngine(ScriptedEngine):
    """Records, at each submit, how many announced requests were still open."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, reply="Hello there.")
        self._arrivals = _CountingArrivals()
        self.open_at_submit: list[int] = []

    def submit(self, request: GenerationRequest) -> GenerationStream:
        assert self._arrivals is not None
        self.open_at_submit.append(self._arrivals.pending)
        return super().submit(request)


def test_generation_requests_are_announced_until_they_are_submitted(tokenizer: Any) -> None:
    engine = _SpyEngine(tokenizer)
    spy = engine._arrivals  # noqa: SLF001 - the count under test
    assert isinstance(spy, _CountingArrivals)
    with live_server(build_app(engine)) as base:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        chat = {"model": engine.model_id, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{base}/v1/chat/completions", json=chat, headers=auth, timeout=60).status_code == 200
        # open at submit: the request's own announcement (from its arrival), ended right after
        assert engine.open_at_submit == [1] and spy.pending == 0 and spy.begun == 1
        three = httpx.post(f"{base}/v1/chat/completions", json={**chat, "n": 3}, headers=auth, timeout=60)
        assert three.status_code == 200 and len(three.json()["choices"]) == 3
        assert engine.open_at_submit[1:] == [1, 1, 1] and spy.pending == 0  # open until the last choice
        streamed = httpx.get(f"{base}/chat/stream", params={"prompt": "hi", "x_api_key": API_KEY}, timeout=60)
        assert streamed.status_code == 200 and engine.open_at_submit[-1] == 1 and spy.pending == 0
        begun = spy.begun
        tokenized = httpx.post(f"{base}/tokenize", json={"prompt": "hi"}, headers=auth)
        assert tokenized.status_code == 200 and spy.begun == begun  # not a generation: not announced
