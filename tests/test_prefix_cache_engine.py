"""BatchEngine with prefix caching on tiny seeded random models (float32): the same answer either way.

Every greedy output is compared with solo ``model.generate`` (or, for the quantized runners, with
the engine with caching off), and ``Finished.cached_tokens`` / ``stats()`` say how much was reused.
Prompts are random token ids (seeded), long enough for several 16-token blocks.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.engine.model_setup import RUNNER_ATTR
from llm_server.engine.quant import QUANTIZATION_ATTR
from llm_server.engine.types import Finished, TextDelta
from tests.test_engine_batching import build_model, consume, first_delta, greedy, request, running_engine
from tests.test_engine_batching import generate_ids as reference_ids

MAX_NEW = 12


def random_ids(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(count)]


SYSTEM = random_ids(1, 70)  # a shared "system prompt": 4 full blocks before its last token


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    return build_model(len(tokenizer))


def run(engine: BatchEngine, ids: list[int], max_new: int = MAX_NEW, rid: str = "r") -> tuple[list[int], Finished]:
    """Token ids (via the text) are not exposed: compare texts, and return the Finished event."""
    events = list(engine.submit(request(rid, ids, greedy(max_new))))
    finished = events[-1]
    assert isinstance(finished, Finished)
    return [len(e.text) for e in events if isinstance(e, TextDelta)], finished


def expected(tokenizer: Any, model: Any, ids: list[int], max_new: int = MAX_NEW) -> str:
    return str(tokenizer.decode(reference_ids(model, ids, max_new), skip_special_tokens=True))


def test_hits_partial_hits_misses_and_strict_prefixes_give_the_reference_output(tokenizer: Any, model: Any) -> None:
    cases = [
        (SYSTEM, 0),  # miss: nothing cached yet
        (SYSTEM, 69),  # full hit: every token before the last (4 whole blocks, 5 positions of the 5th)
        (SYSTEM[:40] + random_ids(2, 30), 40),  # diverges at 40, inside the third block
        (SYSTEM[:35], 34),  # a strict prefix of the cached prompt
        (random_ids(3, 50), 0),  # a miss
    ]
    with running_engine(tokenizer, model) as engine:
        for ids, cached in cases:
            _, finished = run(engine, ids)
            assert finished.text == expected(tokenizer, model, ids)
            assert (finished.cached_tokens, finished.prompt_tokens) == (cached, len(ids))
        stats = engine.stats()
    assert stats.prefix_cache_queries == sum(len(ids) for ids, _ in cases)
    assert stats.prefix_cache_hits == sum(cached for _, cached in cases)
    assert stats.prefix_cache_tokens > 0


def test_the_next_turn_reuses_the_generated_tokens_too(tokenizer: Any, model: Any) -> None:
    first = reference_ids(model, SYSTEM, 20)
    turn2 = SYSTEM + first + random_ids(4, 10)
    with running_engine(tokenizer, model) as engine:
        run(engine, SYSTEM, 20)
        _, finished = run(engine, turn2)
    assert finished.text == expected(tokenizer, model, turn2)
    assert finished.cached_tokens == (len(SYSTEM) + 20 - 1) // 16 * 16  # the last generated id has no KV


def test_caching_off_reports_nothing_and_gives_the_same_output(tokenizer: Any, model: Any) -> None:
    with running_engine(tokenizer, model, prefix_caching=False) as engine:
        results = [run(engine, SYSTEM)[1] for _ in range(2)]
        stats = engine.stats()
    assert [f.cached_tokens for f in results] == [0, 0]
    assert results[1].text == expected(tokenizer, model, SYSTEM)
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.prefix_cache_tokens) == (0, 0, 0)


def test_two_concurrent_requests_with_the_same_prefix(tokenizer: Any, model: Any) -> None:
    prompts = [SYSTEM + random_ids(10 + i, 9) for i in range(3)]

    async def main(engine: BatchEngine) -> list[Finished]:
        streams = [engine.submit(request(f"c{i}", ids, greedy(MAX_NEW))) for i, ids in enumerate(prompts)]
        return [(await consume(s))[1] for s in streams]

    with running_engine(tokenizer, model) as engine:
        cold = asyncio.run(main(engine))  # nothing cached yet
        results = asyncio.run(main(engine))
    references = [expected(tokenizer, model, ids) for ids in prompts]
    assert [f.text for f in cold] == [f.text for f in results] == references
    assert [f.cached_tokens for f in cold] == [0, 64, 64]  # the later ones waited for the first's prefill
    assert [f.cached_tokens for f in results] == [78, 78, 78]  # each its own prompt, but the last token


def test_cancelling_one_of_two_sharers_leaves_the_other_and_the_cache_intact(tokenizer: Any, model: Any) -> None:
    keep, drop = SYSTEM + random_ids(20, 5), SYSTEM + random_ids(21, 5)
    with running_engine(tokenizer, model) as engine:
        run(engine, SYSTEM, 1)
        kept = engine.submit(request("keep", keep, greedy(40)))
        dropped = engine.submit(request("drop", drop, greedy(40)))
        events = first_delta(dropped)
        dropped.cancel()
        del events
        finished = [e for e in kept if isinstance(e, Finished)][0]
        _, again = run(engine, drop)
    assert finished.text == expected(tokenizer, model, keep, 40) and finished.cached_tokens == 64
    assert again.text == expected(tokenizer, model, drop) and again.cached_tokens >= 64


class BudgetWatchingEngine(BatchEngine):
    """The real engine, recording after every scheduler iteration its running requests, reserved
    tokens and cached tokens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history: list[tuple[int, int, int]] = []

    def _iterate(self) -> bool:
        alive = super()._iterate()
        prefix = self._sched.prefix
        self.history.append((self._sched.running, self._sched.reserved_tokens(), prefix.tokens if prefix else 0))
        return alive


def test_eviction_while_a_sharer_runs_does_not_change_its_output(tokenizer: Any, model: Any) -> None:
    sharer, other = SYSTEM + random_ids(30, 5), random_ids(31, 150)
    engine = BudgetWatchingEngine(tokenizer, model, "tiny", EngineConfig(max_total_tokens=400, max_running=2))
    engine.start()
    try:
        run(engine, SYSTEM, 1)
        cached_before = engine.stats().prefix_cache_tokens
        stream = engine.submit(request("sharer", sharer, greedy(60)))
        events = first_delta(stream)  # running, its prefix copied in
        _, big = run(engine, other, 40, rid="big")  # 2 x 190 reserved: the cache must give way
        finished = [e for e in events if isinstance(e, Finished)][0]
    finally:
        engine.shutdown(timeout_s=10)
    assert cached_before == 64 and big.cached_tokens == 0
    assert finished.cached_tokens == 64 and finished.text == expected(tokenizer, model, sharer, 60)
    assert big.text == expected(tokenizer, model, other, 40)
    both_running = [cached for running, _, cached in engine.history if running == 2]
    assert both_running and max(both_running) <= 400 - 2 * 190 < cached_before  # evicted while the sharer ran


def test_reserved_and_cached_tokens_never_exceed_the_budget(tokenizer: Any, model: Any) -> None:
    budget = 300
    engine = BudgetWatchingEngine(tokenizer, model, "tiny", EngineConfig(max_total_tokens=budget, max_running=4))
    engine.start()
    prompts = [random_ids(40 + i % 3, 40 + 7 * i) for i in range(8)]

    async def main() -> list[Finished]:
        streams = [engine.submit(request(f"m{i}", ids, greedy(10))) for i, ids in enumerate(prompts)]
        return [(await consume(s))[1] for s in streams]

    try:
        first = asyncio.run(main())
        second = asyncio.run(main())
    finally:
        engine.shutdown(timeout_s=10)
    assert 0 < max(reserved + cached for _, reserved, cached in engine.history) <= budget
    assert [f.text for f in second] == [f.text for f in first]
    assert sum(f.cached_tokens for f in second) > 0


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_runners_give_the_same_output_with_caching_on_and_off(tokenizer: Any, mode: str) -> None:
    prompts = [SYSTEM, SYSTEM + random_ids(50, 9), SYSTEM[:50]]
    texts: dict[bool, list[str]] = {}
    for caching in (False, True):
        model = build_model(len(tokenizer))
        setattr(model, QUANTIZATION_ATTR, mode)
        with running_engine(tokenizer, model, prefix_caching=caching) as engine:
            results = [run(engine, ids)[1] for ids in prompts]
        texts[caching] = [f.text for f in results]
        assert [f.cached_tokens for f in results] == ([0, 70, 49] if caching else [0, 0, 0])
    assert texts[True] == texts[False]


def test_the_fallback_runner_reports_no_cached_tokens(tokenizer: Any) -> None:
    model = build_model(len(tokenizer), "gpt2")
    setattr(model, RUNNER_ATTR, "hf")  # gpt2 now runs batched (GenericRunner): force the one-sequence fallback
    with running_engine(tokenizer, model) as engine:
        assert engine.runner_name == "HFRunner"
        results = [run(engine, SYSTEM[:30], 5)[1] for _ in range(2)]
        stats = engine.stats()
    assert [f.cached_tokens for f in results] == [0, 0]
    assert results[1].text == expected(tokenizer, model, SYSTEM[:30], 5)
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0)
