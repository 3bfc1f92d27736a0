"""Request states and the scheduler's admission, without a model: states are explicit, finishing
twice is impossible, and admission is bounded by the KV budget (then by ``max_running``)."""

from __future__ import annotations

from typing import Any

import pytest

from llm_server.engine.config import EngineConfig
from llm_server.engine.detokenize import StopMatcher
from llm_server.engine.scheduler import Scheduler
from llm_server.engine.sequence import SeqStatus, Sequence
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import GenerationRequest, SamplingParams


def sequence(rid: str, prompt_len: int, new_tokens: int) -> Sequence:
    request = GenerationRequest(rid, [5] * prompt_len, SamplingParams(max_new_tokens=new_tokens))
    detok: Any = None  # not used by the scheduler
    return Sequence(request=request, stream=GenerationStream(rid), detok=detok, stops=StopMatcher(()),
                    reserved=prompt_len + new_tokens)


def test_a_sequence_moves_through_its_states_once() -> None:
    seq = sequence("a", 3, 4)
    assert seq.status is SeqStatus.WAITING
    seq.advance(SeqStatus.PREFILLING)
    seq.advance(SeqStatus.DECODING)
    assert seq.close() and seq.finished
    assert not seq.close()  # a second finish is a no-op
    assert list(seq.times) == [SeqStatus.WAITING, SeqStatus.PREFILLING, SeqStatus.DECODING, SeqStatus.FINISHED]


@pytest.mark.parametrize("start, target", [
    (SeqStatus.WAITING, SeqStatus.DECODING),
    (SeqStatus.DECODING, SeqStatus.PREFILLING),
    (SeqStatus.FINISHED, SeqStatus.DECODING),
])
def test_illegal_moves_are_refused(start: SeqStatus, target: SeqStatus) -> None:
    seq = sequence("a", 3, 4)
    seq.status = start
    with pytest.raises(AssertionError, match="not a legal move"):
        seq.advance(target)


def test_admission_stops_at_the_kv_budget() -> None:
    scheduler = Scheduler(EngineConfig(max_running=64, max_total_tokens=1000))
    for i in range(10):
        scheduler.add(sequence(f"s{i}", 100, 100))  # 200 tokens each: 5 fit in 1000
    admitted = scheduler.admit()
    assert [s.request_id for s in admitted] == ["s0", "s1", "s2", "s3", "s4"]
    assert all(s.status is SeqStatus.PREFILLING for s in admitted) and len(scheduler.waiting) == 5
    scheduler.remove(admitted[0])
    assert admitted[0].close()
    assert [s.request_id for s in scheduler.admit()] == ["s5"]


def test_admission_stops_at_max_running_and_one_request_always_runs() -> None:
    scheduler = Scheduler(EngineConfig(max_running=3, max_total_tokens=100_000))
    for i in range(5):
        scheduler.add(sequence(f"s{i}", 3, 3))
    assert len(scheduler.admit()) == 3
    alone = Scheduler(EngineConfig(max_total_tokens=10))
    alone.add(sequence("big", 50, 50))  # over the budget, but alone: it runs
    assert len(alone.admit()) == 1


def test_prefill_groups_fit_the_chunk_budget_and_long_prompts_are_chunked() -> None:
    scheduler = Scheduler(EngineConfig(prefill_chunk_tokens=64))
    for seq in (sequence("long", 150, 5), sequence("short", 10, 5)):
        scheduler.add(seq)
    scheduler.admit()
    group = scheduler.schedule_prefill()
    assert [(s.request_id, len(ids)) for s, ids in group] == [("long", 64)]
    assert not scheduler.prefilled(group[0][0], 64)
    assert scheduler.schedule_decode() == []
    scheduler.prefilled(group[0][0], 86)
    assert [s.request_id for s in scheduler.schedule_decode()] == ["long"]
    assert [(s.request_id, len(ids)) for s, ids in scheduler.schedule_prefill()] == [("short", 10)]
