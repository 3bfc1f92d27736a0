"""The step token budget (``step_token_budget``): a long prompt joins a running batch in chunks
sized so that decode rows + chunk fit the budget, the running sequences decode in every one of those
steps, outputs stay ``model.generate``'s, and a budget that leaves no room to prefill is refused."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError

from llm_server.api.settings import load_settings
from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.engine.scheduler import Scheduler
from llm_server.helper_functionality.yaml_loading import ConfigError
from tests.test_engine_batching import build_model, consume, encode, greedy, reference_text, request
from tests.test_engine_scheduler import sequence

# --- the scheduler alone ------------------------------------------------------------------


def scheduler_with(decoding: int, prompts: list[int], **config: Any) -> Scheduler:
    """A scheduler with ``decoding`` sequences decoding and the ``prompts`` (lengths) admitted after them."""
    scheduler = Scheduler(EngineConfig(**config))
    for i in range(decoding):
        scheduler.add(sequence(f"d{i}", 4, 50))
    scheduler.admit()
    for seq in list(scheduler.prefilling):
        scheduler.prefilled(seq, 4)
    for i, length in enumerate(prompts):
        scheduler.add(sequence(f"p{i}", length, 5))
    scheduler.admit()
    return scheduler


def chunks(scheduler: Scheduler) -> list[tuple[str, int]]:
    return [(s.request_id, len(ids)) for s, ids in scheduler.schedule_prefill()]


def test_the_chunk_beside_decode_rows_fills_the_rest_of_the_budget() -> None:
    busy = scheduler_with(10, [300], step_token_budget=100, prefill_chunk_tokens=1024)
    assert len(busy.schedule_decode()) == 10
    assert chunks(busy) == [("p0", 90)]  # 10 decode rows + 90 prompt tokens = the budget
    assert chunks(scheduler_with(0, [300], step_token_budget=100)) == [("p0", 300)]  # nothing to protect
    assert chunks(scheduler_with(10, [300], step_token_budget=0)) == [("p0", 300)]  # budget off: as before
    assert chunks(scheduler_with(10, [300], step_token_budget=500, prefill_chunk_tokens=64)) == [("p0", 64)]


def test_short_prompts_share_what_the_budget_leaves() -> None:
    busy = scheduler_with(10, [30] * 5, step_token_budget=100)
    assert chunks(busy) == [("p0", 30), ("p1", 30), ("p2", 30)]  # 10 + 3 x 30 <= 100 < 10 + 4 x 30


def test_the_budget_is_validated_against_max_running() -> None:
    assert EngineConfig(step_token_budget=65, max_running=64).prefill_tokens_beside(64) == 1
    assert EngineConfig(step_token_budget=0, max_running=64).step_token_budget == 0  # off
    for bad in (64, 10):
        with pytest.raises(ValidationError, match=rf"step_token_budget \({bad}\) must exceed max_running \(64\)"):
            EngineConfig(step_token_budget=bad, max_running=64)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        EngineConfig(step_token_budget=-1)


def test_a_budget_too_small_in_the_yaml_is_a_config_error(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    (tmp_path / "server_config.yaml").write_text("server:\n  engine:\n    max_running: 8\n    step_token_budget: 8\n")
    with pytest.raises(ConfigError, match=r"server\.engine.*step_token_budget \(8\) must exceed max_running \(8\)"):
        load_settings()
    (tmp_path / "server_config.yaml").write_text("server:\n  engine:\n    step_token_budget: 0\n")
    assert load_settings().engine.step_token_budget == 0


# --- the engine on the tiny model ---------------------------------------------------------


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    return build_model(len(tokenizer))


class StepWatchingEngine(BatchEngine):
    """The real engine, recording after every scheduler iteration how many prompt tokens the
    ``long`` request has prefilled and how many tokens each running ``s*`` request has generated."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[int, dict[str, int]]] = []

    def _iterate(self) -> bool:
        alive = super()._iterate()
        running = [*self._sched.prefilling, *self._sched.decoding]
        long = next((s.prefilled for s in running if s.request_id == "long"), 0)
        shorts = {s.request_id: len(s.generated) for s in self._sched.decoding if s.request_id.startswith("s")}
        self.steps.append((long, shorts))
        return alive


def run_long_beside_shorts(tokenizer: Any, model: Any, **config: Any) -> tuple[StepWatchingEngine, list[Any]]:
    """Three short requests streaming, then a long prompt arrives; every result."""
    shorts = [encode(tokenizer, p) for p in ("Hi", "Once upon a time", "The quick brown fox")]
    long_prompt = encode(tokenizer, " ".join(f"word{i}" for i in range(120)))
    engine = StepWatchingEngine(tokenizer, model, "tiny", EngineConfig(max_running=4, **config))
    engine.start()

    async def scenario() -> list[Any]:
        started = [asyncio.Event() for _ in shorts]
        tasks = [asyncio.create_task(consume(engine.submit(request(f"s{i}", p, greedy(60))), ev, after=2))
                 for i, (p, ev) in enumerate(zip(shorts, started, strict=True))]
        for event in started:
            await event.wait()
        tasks.append(asyncio.create_task(consume(engine.submit(request("long", long_prompt, greedy(10))))))
        return list(await asyncio.gather(*tasks))

    try:
        results = asyncio.run(scenario())
    finally:
        engine.shutdown(timeout_s=10)
    prompts = [*shorts, long_prompt]
    for prompt, (_, finished) in zip(prompts, results, strict=True):
        assert finished.text == reference_text(tokenizer, model, prompt, finished.completion_tokens)
    return engine, results


def prefill_steps(engine: StepWatchingEngine) -> list[tuple[int, int, dict[str, int]]]:
    """(chunk size, decoding before, new tokens of each short still running) of each step that
    prefilled a chunk of the long prompt."""
    found = []
    for (before, shorts_before), (after, shorts_after) in zip(engine.steps, engine.steps[1:], strict=False):
        if after > before:
            grown = {rid: shorts_after[rid] - n for rid, n in shorts_before.items() if rid in shorts_after}
            found.append((after - before, len(shorts_before), grown))
    return found


def test_a_long_prompt_joins_in_budget_sized_chunks_while_every_stream_decodes(tokenizer: Any, model: Any) -> None:
    engine, results = run_long_beside_shorts(tokenizer, model, step_token_budget=40)
    steps = prefill_steps(engine)
    prompt_len = results[-1][1].prompt_tokens
    assert sum(chunk for chunk, _, _ in steps) == prompt_len > 200
    assert len(steps) >= prompt_len // 40  # in chunks, one per iteration
    for chunk, decoding, grown in steps:
        assert decoding and chunk <= 40 - decoding  # decode rows + chunk within the budget
        assert grown and set(grown.values()) == {1}  # every running stream got its token in that step


def test_without_the_budget_the_long_prompt_is_one_forward(tokenizer: Any, model: Any) -> None:
    engine, results = run_long_beside_shorts(tokenizer, model, step_token_budget=0)
    steps = prefill_steps(engine)
    assert [chunk for chunk, _, _ in steps] == [results[-1][1].prompt_tokens]  # the streams waited for all of it
