"""Issue 24: admission by expected wait (engine/admission.py), alone and inside the BatchEngine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from llm_server.engine.admission import Admission, StepTimeModel
from llm_server.engine.config import EngineConfig
from llm_server.engine.types import EngineOverloaded, SamplingParams
from tests.openai_harness import wait_until
from tests.test_engine_batching import build_model, consume, encode, request, running_engine


@dataclass
class Seq:
    """A fake queued sequence: what the estimate reads."""

    prompt_len: int
    new_tokens: int
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0

    @property
    def reserved(self) -> int:
        return self.prompt_len + self.new_tokens


def admission(step_s: float | None = 0.1, **config: Any) -> Admission:
    """An Admission that measured full-batch steps of ``step_s`` (None: nothing measured)."""
    gate = Admission(EngineConfig(**{"max_running": 4, "max_total_tokens": 100_000, **config}))
    if step_s is not None:
        gate.record_step(step_s, gate.config.max_running)
    return gate


def test_the_step_time_model_fits_a_line_and_is_pessimistic_with_one_batch_size() -> None:
    model = StepTimeModel()
    for rows in (1, 8, 16, 32, 64) * 4:
        model.add(0.02 + 0.001 * rows, rows)
    assert model.predict(64) == pytest.approx(0.084, rel=1e-6)
    assert model.predict(1) == pytest.approx(0.021, rel=1e-6)
    single = StepTimeModel()
    single.add(0.05, 4)
    assert single.predict(2) == pytest.approx(0.05) and single.predict(16) == pytest.approx(0.2)


def test_free_slots_mean_no_wait() -> None:
    gate = admission()
    assert gate.wait_steps([Seq(10, 50, prefilled=10)], [], 60) == 0


def test_a_full_batch_waits_for_its_first_free_slot() -> None:
    gate = admission()
    running = [Seq(10, 50, generated=[0] * g, prefilled=10) for g in (0, 10, 20, 45)]
    assert gate.wait_steps(running, [], 60) == 5  # the one with 5 tokens left
    waiting = [Seq(10, 50)]  # takes that slot first: 1 prefill step + 50 tokens
    assert gate.wait_steps(running, waiting, 60) == 30  # the next slot frees after 30 steps


def test_a_burst_is_queued_while_it_would_start_within_the_bound() -> None:
    gate = admission(step_s=0.1, max_queue_wait_s=30)
    running = [Seq(10, 64, prefilled=10) for _ in range(4)]
    waiting: list[Seq] = []
    for _ in range(100):  # 64 steps per slot-turn, 4 slots, 0.1 s a step: ~17 requests within 30 s
        try:
            gate.check(running, waiting, 74)
        except EngineOverloaded as exc:
            refused = exc
            break
        waiting.append(Seq(10, 64))
    else:
        pytest.fail("nothing was refused")
    assert 12 <= len(waiting) <= 20, len(waiting)
    assert refused.retry_after_s >= 1
    assert "wait about" in str(refused)


def test_retry_after_comes_from_the_estimate() -> None:
    gate = admission(step_s=1.0, max_queue_wait_s=10)
    running = [Seq(10, 200, prefilled=10) for _ in range(4)]  # 200 s until the first slot frees
    with pytest.raises(EngineOverloaded) as caught:
        gate.check(running, [], 210)
    assert caught.value.retry_after_s == 190


def test_nothing_is_refused_on_time_before_a_step_is_measured_but_max_waiting_holds() -> None:
    gate = admission(step_s=None, max_waiting=3)
    running = [Seq(10, 10_000, prefilled=10) for _ in range(4)]
    waiting = [Seq(10, 10_000) for _ in range(3)]
    gate.check(running, waiting[:2], 10_010)
    with pytest.raises(EngineOverloaded, match="queued"):
        gate.check(running, waiting, 10_010)


def test_the_kv_budget_lowers_the_slots() -> None:
    gate = admission(max_running=8, max_total_tokens=200)  # reservations of 100: 2 slots
    running = [Seq(10, 90, prefilled=10), Seq(10, 90, generated=[0] * 80, prefilled=10)]
    assert gate.wait_steps(running, [], 100) == 10


# --- in the engine ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    return build_model(len(tokenizer))


def test_the_engine_queues_a_burst_beyond_the_old_queue_length(tokenizer: Any, model: Any) -> None:
    """80 requests on 4 slots: all queued and all answered (max_waiting used to refuse past 64)."""
    params = SamplingParams(max_new_tokens=4, do_sample=False)
    with running_engine(tokenizer, model, max_running=4, max_total_tokens=4096) as engine:
        streams = [engine.submit(request(f"r{i}", encode(tokenizer, f"hello {i}"), params)) for i in range(80)]

        async def all_of() -> list[Any]:
            return await asyncio.gather(*(consume(s) for s in streams))

        finished = [f for _, f in asyncio.run(all_of())]
    assert len(finished) == 80 and all(f.reason in ("stop", "length") for f in finished)
    assert all(f.timeline["prefilling"] >= f.timeline["waiting"] for f in finished)  # queue time is known


def test_the_engine_refuses_a_request_that_would_wait_too_long(tokenizer: Any, model: Any) -> None:
    long = SamplingParams(max_new_tokens=400, do_sample=False)  # this prompt runs all 400 (no EOS)
    with running_engine(tokenizer, model, max_running=1, max_total_tokens=4096, max_queue_wait_s=0.001) as engine:
        first = engine.submit(request("first", encode(tokenizer, "hello"), long))
        # once a step has run (and been measured), a new request would wait for the running one
        assert wait_until(lambda: engine.stats().expected_wait_s > 0, timeout_s=60)
        with pytest.raises(EngineOverloaded) as caught:
            engine.submit(request("second", encode(tokenizer, "hi"), long))
        assert caught.value.retry_after_s >= 1
        first.cancel()
