"""Speculative decoding (engine/speculative.py) on tiny random float32 models.

Greedy output must be token-identical with speculation on and off and equal ``model.generate``,
whatever the prediction (exact, partly right, wrong), with penalties, in a batch with rows that do
not speculate, and at the edges: a stop string or ``max_new_tokens`` reached inside an accepted
draft, a cancellation while drafts run, a prefix cache fed by a speculating request.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from llm_server.engine.model_setup import RUNNER_ATTR
from llm_server.engine.speculative import NgramIndex
from llm_server.engine.types import Finished, GenerationRequest, InvalidRequest, SamplingParams, TextDelta
from tests.test_engine_batching import (
    PROMPTS,
    build_model,
    consume,
    encode,
    generate_ids,
    greedy,
    request,
    run_staggered,
    running_engine,
)


def predicted(rid: str, prompt: list[int], params: SamplingParams, prediction: list[int] | None) -> GenerationRequest:
    return GenerationRequest(rid, prompt, params, tuple(prediction) if prediction is not None else None)


def mangled(ids: list[int], every: int = 5) -> list[int]:
    """``ids`` with every ``every``-th id changed: a prediction that is only partly right."""
    return [(t + 7) % 1000 if i % every == every - 1 else t for i, t in enumerate(ids)]


@pytest.fixture(scope="module")
def llama(tokenizer: Any) -> Any:
    return build_model(len(tokenizer))


# --- the n-gram index -------------------------------------------------------------------------
def test_ngram_index_follows_the_longest_match_from_the_cursor() -> None:
    index = NgramIndex([5, 6, 7, 8, 5, 6, 9, 10])
    assert index.follow([1, 5, 6], 3, 1) == ([7, 8, 5], 2)  # "5 6" first occurs at 0: 7 follows
    assert index.follow([1, 5, 6], 3, 1, cursor=3) == ([9, 10], 6)  # from the cursor on: the second "5 6"
    assert index.follow([4, 8, 5], 2, 1) == ([6, 9], 5)  # the 2-gram "8 5" beats the 1-gram "5"
    assert index.follow([3, 4], 2, 1) == ([], -1)  # no match
    assert index.follow([10], 2, 1) == ([], -1)  # the last id has no continuation
    assert index.follow([9, 7], 2, 2) == ([], -1)  # n >= 2 asked: the 1-gram "7" does not count


def test_ngram_index_grows_with_the_output() -> None:
    index = NgramIndex()
    index.extend([1, 2, 3])
    index.extend([1, 2])
    assert index.follow([1, 2], 4, 2) == ([3, 1, 2], 2)


# --- greedy output is unchanged ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("case", ["exact", "partial", "wrong", "none"])
def test_greedy_output_is_generates_whatever_the_prediction(tokenizer: Any, kind: str, case: str) -> None:
    model = build_model(len(tokenizer), kind)
    prompt = encode(tokenizer, PROMPTS[1])
    reference = generate_ids(model, prompt, 40)
    prediction = {"exact": reference, "partial": mangled(reference), "wrong": [11 + i for i in range(40)],
                  "none": None}[case]
    with running_engine(tokenizer, model, speculative_tokens=8) as engine:
        assert engine.runner_name == ("GenericRunner" if kind == "gpt2" else "LlamaRunner")
        finished = engine.submit(predicted("p", prompt, greedy(40), prediction)).result()
        stats = engine.stats()
    assert finished.text == tokenizer.decode(reference, skip_special_tokens=True)
    assert finished.completion_tokens == len(reference)
    assert finished.accepted_prediction_tokens == stats.spec_accepted_tokens
    assert stats.spec_draft_tokens == finished.accepted_prediction_tokens + finished.rejected_prediction_tokens
    if case == "exact":  # every draft accepted: 8 per step, the model's own token after them
        assert finished.accepted_prediction_tokens >= (len(reference) - 1) * 8 // 9 - 1
        assert finished.rejected_prediction_tokens == 0
    if case == "partial":
        assert finished.accepted_prediction_tokens > len(reference) // 2
    if case == "none":
        assert stats.spec_draft_tokens == 0


def test_penalties_and_speculation(tokenizer: Any, llama: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[3])
    params = greedy(40, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3)
    texts = {}
    for k in (0, 8):
        with running_engine(tokenizer, llama, speculative_tokens=k) as engine:
            plain = engine.submit(request("plain", prompt, params)).result()
            spec = engine.submit(predicted("spec", prompt, params, encode(tokenizer, plain.text)[1:])).result()
        texts[k] = (plain.text, spec.text, spec.accepted_prediction_tokens)
    assert texts[0][0] == texts[0][1] == texts[8][0] == texts[8][1]
    assert generate_ids(llama, prompt, 40, repetition_penalty=1.3)  # the HF reference runs (no OpenAI penalties there)
    assert texts[8][2] > 0 and texts[0][2] == 0
    rep_only = greedy(40, repetition_penalty=1.3)
    with running_engine(tokenizer, llama, speculative_tokens=8) as engine:
        reference = generate_ids(llama, prompt, 40, repetition_penalty=1.3)
        finished = engine.submit(predicted("r", prompt, rep_only, reference)).result()
    assert finished.text == tokenizer.decode(reference, skip_special_tokens=True)
    assert finished.accepted_prediction_tokens >= (len(reference) - 1) * 8 // 9 - 1


def test_seeded_sampling_is_the_same_with_speculation_on_and_off(tokenizer: Any, llama: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[2])
    params = SamplingParams(max_new_tokens=30, do_sample=True, temperature=0.7, seed=123)
    with running_engine(tokenizer, llama, speculative_tokens=0) as engine:
        plain = engine.submit(request("plain", prompt, params)).result()
    with running_engine(tokenizer, llama, speculative_tokens=8) as engine:
        spec = engine.submit(predicted("spec", prompt, params, encode(tokenizer, plain.text)[1:])).result()
    assert spec.text == plain.text  # one uniform number per token either way
    assert spec.accepted_prediction_tokens > 0


def test_batched_with_rows_that_do_not_speculate(tokenizer: Any, llama: Any) -> None:
    prompts = [encode(tokenizer, p) for p in PROMPTS]
    budgets = [30, 12, 25, 18, 30]
    references = [generate_ids(llama, p, n) for p, n in zip(prompts, budgets, strict=True)]
    predictions: list[list[int] | None] = [references[0], None, mangled(references[2], 3), None, [5] * 10]
    with running_engine(tokenizer, llama, max_running=4, speculative_tokens=8) as engine:
        requests = [predicted(f"r{i}", p, greedy(n), pred)
                    for i, (p, n, pred) in enumerate(zip(prompts, budgets, predictions, strict=True))]
        results = run_staggered(engine, requests)
        assert engine.stats().spec_accepted_tokens > 0
    for reference, (deltas, finished) in zip(references, results, strict=True):
        assert finished.text == tokenizer.decode(reference, skip_special_tokens=True)
        assert "".join(deltas) == finished.text
        assert finished.completion_tokens == len(reference)


def test_prompt_lookup_for_every_request(tokenizer: Any) -> None:
    """``speculative_lookup``: drafts from the prompt and the output, no prediction needed (this
    model's greedy output repeats itself)."""
    model = build_model(len(tokenizer), "gpt2")
    prompt = encode(tokenizer, PROMPTS[1])
    reference = generate_ids(model, prompt, 40)
    with running_engine(tokenizer, model, speculative_tokens=6, speculative_lookup=True) as engine:
        finished = engine.submit(request("l", prompt, greedy(40))).result()
        stats = engine.stats()
    assert finished.text == tokenizer.decode(reference, skip_special_tokens=True)
    assert stats.spec_accepted_tokens > 0


# --- edges --------------------------------------------------------------------------------------
def test_max_new_tokens_reached_inside_an_accepted_draft(tokenizer: Any, llama: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[1])
    reference = generate_ids(llama, prompt, 40)
    with running_engine(tokenizer, llama, speculative_tokens=8) as engine:
        for budget in (1, 2, 5, 13):
            finished = engine.submit(predicted(f"m{budget}", prompt, greedy(budget), reference)).result()
            assert finished.completion_tokens == budget
            assert finished.reason == "length"
            assert finished.text == tokenizer.decode(reference[:budget], skip_special_tokens=True)


def test_stop_string_inside_an_accepted_draft(tokenizer: Any, llama: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[1])
    reference = generate_ids(llama, prompt, 40)
    text = tokenizer.decode(reference, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    with running_engine(tokenizer, llama, speculative_tokens=0) as engine:
        plain = engine.submit(request("plain", prompt, greedy(40, stop=(stop,)))).result()
    with running_engine(tokenizer, llama, speculative_tokens=8) as engine:
        stream = engine.submit(predicted("spec", prompt, greedy(40, stop=(stop,)), reference))
        events = list(stream)
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason == "stop"
    assert finished.text == plain.text == text[: text.index(stop)]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == finished.text
    assert finished.completion_tokens == plain.completion_tokens  # no token generated past the stop
    assert finished.accepted_prediction_tokens > 0


def test_cancellation_mid_speculation_leaves_the_engine_healthy(tokenizer: Any, llama: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[1])
    reference = generate_ids(llama, prompt, 200)

    async def scenario() -> Finished:
        started = asyncio.Event()
        stream = engine.submit(predicted("c", prompt, greedy(200), reference))
        task = asyncio.create_task(consume(stream, started, after=2))
        await started.wait()
        stream.cancel()
        return (await task)[1]

    with running_engine(tokenizer, llama, speculative_tokens=8) as engine:
        finished = asyncio.run(scenario())
        assert finished.reason in ("cancelled", "length")
        after = engine.submit(predicted("next", prompt, greedy(20), reference)).result()
        assert engine.stats().healthy and engine.stats().running == 0
    assert after.text == tokenizer.decode(reference[:20], skip_special_tokens=True)


def test_the_prefix_cache_keeps_only_accepted_positions(tokenizer: Any, llama: Any) -> None:
    """A speculating request with a partly wrong prediction saves its blocks; the next turn, whose
    prompt starts with its prompt and output, reuses them and still equals ``model.generate``."""
    prompt = encode(tokenizer, " ".join(PROMPTS))
    reference = generate_ids(llama, prompt, 48)
    follow_up = prompt + reference + encode(tokenizer, "And then?")[1:]
    with running_engine(tokenizer, llama, speculative_tokens=8) as engine:
        first = engine.submit(predicted("a", prompt, greedy(48), mangled(reference, 4))).result()
        second = engine.submit(request("b", follow_up, greedy(20))).result()
    assert first.rejected_prediction_tokens > 0
    assert second.cached_tokens >= len(prompt) + len(reference) - 16
    assert second.text == tokenizer.decode(generate_ids(llama, follow_up, 20), skip_special_tokens=True)


def test_prediction_ids_outside_the_vocabulary_are_refused(tokenizer: Any, llama: Any) -> None:
    with running_engine(tokenizer, llama) as engine:
        with pytest.raises(InvalidRequest, match="prediction token id"):
            engine.submit(predicted("bad", [1, 5], greedy(4), [3, len(tokenizer) + 5]))
        assert engine.submit(predicted("ok", [1, 5], greedy(4), [3])).result().completion_tokens == 4


def test_the_fallback_runner_does_not_speculate(tokenizer: Any) -> None:
    model = build_model(len(tokenizer), "gpt2")
    setattr(model, RUNNER_ATTR, "hf")
    prompt = encode(tokenizer, PROMPTS[2])
    reference = generate_ids(model, prompt, 12)
    with running_engine(tokenizer, model, speculative_tokens=8) as engine:
        assert engine.runner_name == "HFRunner"
        finished = engine.submit(predicted("h", prompt, greedy(12), reference)).result()
        assert engine.stats().spec_draft_tokens == 0
    assert finished.text == tokenizer.decode(reference, skip_special_tokens=True)
    assert finished.accepted_prediction_tokens == 0


# --- grammar-forced ids as drafts -------------------------------------------------------------
VERDICT = {"type": "object", "properties": {"better": {"type": "string", "enum": ["A", "B"]}},
           "required": ["better"], "additionalProperties": False}
LISTED = {"type": "object", "properties": {"items": {"type": "array", "items": {"enum": ["red", "green"]},
                                                     "minItems": 1, "maxItems": 3}},
          "required": ["items"], "additionalProperties": False}


@pytest.mark.parametrize("schema", [VERDICT, LISTED], ids=["verdict", "list"])
def test_grammar_forced_ids_are_drafted_and_change_nothing(tokenizer: Any, llama: Any, schema: Any) -> None:
    """A constrained request drafts the ids its grammar forces (the keys, the punctuation): greedy
    and seeded sampled output equal speculation off and ``model.generate`` with the grammar, the
    forced ids are counted apart from prediction tokens, and a free row in the batch is unchanged."""
    from llm_server.engine.constraints import GrammarLogitsProcessor, compiler_for

    grammar = compiler_for(tokenizer).json_schema(schema)
    prompts = [encode(tokenizer, p) for p in PROMPTS[:3]]
    params = [greedy(24, constraint=grammar), greedy(24, constraint=grammar),
              SamplingParams(max_new_tokens=24, do_sample=True, temperature=0.9, seed=7, constraint=grammar)]
    outputs: dict[int, list[Finished]] = {}
    for k in (0, 8):
        with running_engine(tokenizer, llama, speculative_tokens=k) as engine:
            requests = [request(f"g{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params, strict=True))]
            requests.append(request("free", prompts[0], greedy(16)))
            outputs[k] = [finished for _, finished in run_staggered(engine, requests)]
            stats = engine.stats()
        if k:
            assert stats.spec_forced_tokens > 0
            assert stats.spec_draft_tokens == stats.spec_accepted_tokens == 0  # no prediction, no lookup
    assert [f.text for f in outputs[8]] == [f.text for f in outputs[0]]
    assert all(f.accepted_prediction_tokens == f.rejected_prediction_tokens == 0 for f in outputs[8])
    for prompt, finished in zip(prompts[:2], outputs[8][:2], strict=True):
        reference = generate_ids(llama, prompt, 24, logits_processor=[GrammarLogitsProcessor(grammar)])
        assert finished.text == tokenizer.decode(reference, skip_special_tokens=True)
        json.loads(finished.text)
    assert outputs[8][3].text == tokenizer.decode(generate_ids(llama, prompts[0], 16), skip_special_tokens=True)


def test_forced_ids_are_verified_like_any_draft(tokenizer: Any, llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced ids the model would spell otherwise are refused by verification: with a matcher
    whose forced ids are wrong, the output is still the grammar's greedy output."""
    from llm_server.engine.constraints import GrammarMatcher, compiler_for

    grammar = compiler_for(tokenizer).json_schema(VERDICT)
    prompt = encode(tokenizer, PROMPTS[1])
    with running_engine(tokenizer, llama, speculative_tokens=0) as engine:
        plain = engine.submit(request("plain", prompt, greedy(24, constraint=grammar))).result()
    monkeypatch.setattr(GrammarMatcher, "forced", lambda self: [11, 12, 13])
    with running_engine(tokenizer, llama, speculative_tokens=8) as engine:
        spec = engine.submit(request("spec", prompt, greedy(24, constraint=grammar))).result()
        assert engine.stats().spec_forced_tokens == 0
    assert spec.text == plain.text and spec.completion_tokens == plain.completion_tokens
    json.loads(spec.text)


def test_drafts_keep_a_step_of_few_rows_within_the_runners_fast_path() -> None:
    """``auto``'s int4 copy serves steps of at most 8 new tokens: one row drafts 7 (8 rows), two
    rows 3 each; from 8 rows on the step is past it anyway and the usual budget applies."""
    from types import SimpleNamespace

    from llm_server.engine.speculative import STEP_TOKEN_BUDGET, Speculator

    def limits(speculator: Speculator, rows: int) -> list[int]:
        asked: list[int] = []
        drafter = SimpleNamespace(propose=lambda generated, limit, forced: asked.append(limit) or [5] * limit)
        params = SimpleNamespace(max_new_tokens=100)
        batch = [SimpleNamespace(drafter=drafter, matcher=None, generated=[1], request=SimpleNamespace(params=params))
                 for _ in range(rows)]
        drafts = speculator.drafts(batch)  # type: ignore[arg-type]
        assert drafts is not None and sum(len(d) + 1 for d in drafts) == rows * (asked[0] + 1)
        return asked

    fast, plain = Speculator(8, False, fast_tokens=8), Speculator(8, False)
    assert limits(fast, 1) == [7] and limits(plain, 1) == [8]
    assert limits(fast, 2) == [3, 3] and limits(plain, 2) == [8, 8]
    assert limits(fast, 8) == limits(plain, 8) == [STEP_TOKEN_BUDGET // 8 - 1] * 8


def test_a_request_whose_drafts_are_refused_whole_rests_longer_each_time_until_one_is_accepted() -> None:
    """A refused draft costs a verify step; a request whose drafts keep being refused whole (a
    sampled revision that rewrote instead of copying) drafts nothing for 1, 2, 4 ... MAX_REST steps,
    and drafts at every step again once a draft is accepted, even in part."""
    from llm_server.engine.speculative import MAX_REST, Drafter

    prediction = list(range(100, 164))
    drafter = Drafter([1, 2, 3], prediction, max_tokens=4)

    def steps_until_a_draft() -> int:
        for idle in range(MAX_REST + 2):
            if drafter.propose([100, 101], limit=4):
                return idle
        raise AssertionError("the drafter never drafted again")

    assert steps_until_a_draft() == 0
    rests = []
    for _ in range(6):  # the draft just proposed is refused whole, and so is each next one
        drafter.adapt(2, 0)
        rests.append(steps_until_a_draft())
    assert rests == [1, 2, 4, 8, 16, MAX_REST] and MAX_REST == 16
    drafter.adapt(2, 1)  # accepted in part: no rest, and the next whole refusal rests one step again
    assert steps_until_a_draft() == 0
    drafter.adapt(2, 0)
    assert steps_until_a_draft() == 1
