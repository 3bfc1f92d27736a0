"""The sampler's per-request fields: penalties, logit_bias, top-k, min-p (engine/sampler.py).

Checked by what they do to the output: token by token against ``model.generate`` where
transformers has the same processor, against a one-row reference on random logits (hypothesis),
and by their effect on a tiny seeded model's greedy and sampled text.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_server.engine.sampler import Sampler, SamplerState, process_logits
from llm_server.engine.types import InvalidRequest, SamplingParams
from tests.test_engine_batching import (
    PROMPTS,
    build_model,
    encode,
    generate_ids,
    greedy,
    request,
    run_staggered,
    running_engine,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    return build_model(len(tokenizer))


# --- one-row reference ---------------------------------------------------------------------


def reference_row(
    logits: list[float],
    params: SamplingParams,
    prompt: list[int],
    generated: list[int],
    default_top_k: int,
    ambiguous: set[int] | None = None,
) -> list[float]:
    """The module docstring's steps for one row, written out element by element.

    Ids at a filter's boundary (a tie at the k-th value or at the top-p cut, a probability equal to the min-p
    threshold up to rounding) may go either way; they are added to ``ambiguous``.
    """
    ambiguous = set() if ambiguous is None else ambiguous
    out = list(logits)
    for token_id, bias in params.logit_bias:
        out[token_id] += bias
    if params.repetition_penalty != 1.0:
        for t in set(prompt) | set(generated):
            out[t] = out[t] * params.repetition_penalty if out[t] < 0 else out[t] / params.repetition_penalty
    for t in set(generated):
        out[t] -= params.presence_penalty + params.frequency_penalty * generated.count(t)
    if params.greedy:
        return out
    out = [v / params.temperature for v in out]
    k = default_top_k if params.top_k is None else params.top_k
    if 0 < k < len(out):
        kth = sorted(out, reverse=True)[k - 1]
        if sum(v >= kth for v in out) > k:  # a tie at the k-th value: the tied ids may go either way
            ambiguous.update(i for i, v in enumerate(out) if v == kth)
        out = [v if v >= kth else -math.inf for v in out]
    if params.top_p < 1.0:
        probs = torch.softmax(torch.tensor(out, dtype=torch.float64), 0).tolist()
        order = sorted(range(len(out)), key=lambda i: probs[i], reverse=True)
        kept, mass = set(), 0.0
        for i in order:
            kept.add(i)
            mass += probs[i]
            if mass >= params.top_p - 1e-6:
                ambiguous.update(
                    j for j in order if abs(probs[j] - probs[i]) <= 1e-6 or abs(mass - params.top_p) <= 1e-5
                )
                break
        out = [v if i in kept else -math.inf for i, v in enumerate(out)]
    if params.min_p > 0.0:
        probs = torch.softmax(torch.tensor(out, dtype=torch.float64), 0).tolist()
        threshold = params.min_p * max(probs)
        ambiguous.update(i for i, p in enumerate(probs) if abs(p - threshold) <= 1e-5 * max(probs))
        out = [v if p >= threshold else -math.inf for v, p in zip(out, probs, strict=True)]
    return out


VOCAB = 12
row_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
    top_k=st.sampled_from([None, 0, 1, 3, 7]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
    repetition_penalty=st.sampled_from([1.0, 1.25, 0.5]),
    presence_penalty=st.sampled_from([0.0, 0.75, -0.5]),
    frequency_penalty=st.sampled_from([0.0, 0.25, -1.0]),
    logit_bias=st.lists(
        st.tuples(st.integers(0, VOCAB - 1), st.sampled_from([-100.0, -2.5, 3.0, 100.0])),
        max_size=3,
        unique_by=lambda p: p[0],
    ).map(tuple),
    seed=st.one_of(st.none(), st.integers(0, 2**31)),
)
row = st.tuples(
    row_params,
    # logits on a 1/8 grid, penalties and biases dyadic: a tie is a tie in float32 and in float64
    st.lists(st.integers(-64, 64).map(lambda v: v / 8), min_size=VOCAB, max_size=VOCAB),
    st.lists(st.integers(0, VOCAB - 1), max_size=4),
    st.lists(st.integers(0, VOCAB - 1), max_size=6),
)


def make_state(params: SamplingParams, prompt: list[int], generated: list[int]) -> SamplerState:
    state = SamplerState.create(params, prompt, VOCAB, CPU)
    for t in generated:
        state.observe(t)
    return state


def assert_same_row(batched: list[float], expected: list[float], ambiguous: set[int]) -> None:
    pairs = [(a, b) for i, (a, b) in enumerate(zip(batched, expected, strict=True)) if i not in ambiguous]
    assert [a == -math.inf for a, _ in pairs] == [b == -math.inf for _, b in pairs]
    finite = [(a, b) for a, b in pairs if math.isfinite(b)]
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in finite)


def _ties_at_kth(values: list[float], k: int) -> bool:
    """More than ``k`` ids reach the k-th largest value (``k`` >= the vocabulary: no top-k)."""
    if k >= len(values):
        return False
    kth = sorted(values, reverse=True)[k - 1]
    return sum(v >= kth for v in values) > k


def _tie_in_top(values: list[float], k: int) -> bool:
    """Two of the ``k + 1`` largest values are equal (``k`` >= the vocabulary: no top-k, no tie matters)."""
    if k >= len(values):
        return False
    top = sorted(values, reverse=True)[: k + 1]
    return len(set(top)) < len(top)


@settings(max_examples=150, deadline=None, print_blob=True)
@given(st.lists(row, min_size=1, max_size=6), st.integers(0, 5))
def test_batched_sampler_equals_the_one_row_reference(rows: list[Any], default_top_k: int) -> None:
    sampler = Sampler(CPU, seed=0, top_k=default_top_k)
    states = [make_state(p, prompt, gen) for p, _, prompt, gen in rows]
    logits = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    processed = process_logits(logits, states)
    sampled = [i for i, s in enumerate(states) if not s.params.greedy]
    warped = sampler.warp(processed[sampled], [states[i] for i in sampled]) if sampled else None
    for i, (params, values, prompt, gen) in enumerate(rows):
        ambiguous: set[int] = set()
        expected = reference_row(values, params, prompt, gen, default_top_k, ambiguous)
        got = warped[sampled.index(i)] if i in sampled else processed[i]  # type: ignore[index]
        assert_same_row(got.tolist(), expected, ambiguous)
    if sampled:  # the top-k fast path (filters on the max-k candidates only) gives the same distribution
        rows_k = [sampler._row_top_k(states[i].params, VOCAB) for i in sampled]
        if max(rows_k) < VOCAB:
            values, ids = torch.topk(processed[sampled], max(rows_k), dim=-1)
            fast = sampler._warp_candidates(values, [states[i] for i in sampled], rows_k)
            full = torch.full_like(processed[sampled], float("-inf")).scatter(1, ids, fast)
            for j, i in enumerate(sampled):
                if _ties_at_kth(processed[i].tolist(), rows_k[j]):
                    continue  # the fast path keeps exactly k of the tied ids, the full one all (documented)
                ambiguous = set()
                reference_row(rows[i][1], rows[i][0], rows[i][2], rows[i][3], default_top_k, ambiguous)
                assert_same_row(full[j].tolist(), warped[j].tolist(), ambiguous)  # type: ignore[index]
    # the chosen ids: greedy rows take the argmax; a seeded row draws the same id alone and in the batch
    ids = sampler.select(logits, [make_state(p, pr, g) for p, _, pr, g in rows])
    for i, (params, values, prompt, gen) in enumerate(rows):
        ambiguous = set()
        expected = reference_row(values, params, prompt, gen, default_top_k, ambiguous)
        assert expected[ids[i]] > -math.inf or ids[i] in ambiguous
        if params.greedy:
            assert expected[ids[i]] == pytest.approx(max(expected), rel=1e-5, abs=1e-4)
        elif params.seed is not None and not _tie_in_top(processed[i].tolist(), sampler._row_top_k(params, VOCAB)):
            # (a tie in a top-k row's k + 1 likeliest: torch.topk may order the tied ids differently for
            # the batch's larger k, so the same uniform picks another of them: same distribution, other id)
            alone = Sampler(CPU, seed=99, top_k=default_top_k).select(
                logits[i : i + 1], [make_state(params, prompt, gen)]
            )
            assert alone == [ids[i]]


def test_warpers_equal_transformers_processors() -> None:
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    for temperature, top_k, top_p, min_p in [
        (0.7, 40, 1.0, 0.0),
        (1.3, 0, 1.0, 0.1),
        (1.0, 20, 0.9, 0.05),
        (0.5, 5, 1.0, 0.2),
    ]:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        ours = Sampler(CPU, seed=0).warp(logits, [SamplerState.create(params, [], 300, CPU) for _ in range(4)])
        chain: list[Any] = [TemperatureLogitsWarper(temperature)]
        chain += [TopKLogitsWarper(top_k)] if top_k else []
        chain += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
        chain += [MinPLogitsWarper(min_p)] if min_p else []
        theirs = LogitsProcessorList(chain)(torch.zeros(4, 1, dtype=torch.long), logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        assert torch.allclose(torch.softmax(ours, -1), torch.softmax(theirs, -1), atol=1e-6)


def test_top_p_rows_without_top_k_draw_from_the_same_nucleus_without_a_sort() -> None:
    """A top-p row without top-k whose nucleus lies in its likeliest candidates is drawn among
    them; their warped distribution, put back in the vocabulary, is the sort-based warp's."""
    torch.manual_seed(0)
    vocab = 2000
    peaked = torch.randn(3, vocab) * 0.5
    peaked[:, :40] += torch.linspace(9.0, 4.0, 40)  # most mass in 40 ids, a real tail behind them
    flat = torch.randn(1, vocab) * 0.5
    logits = torch.cat([peaked, flat])
    settings_ = [(1.0, 0.9, 0.0), (0.7, 0.95, 0.0), (1.2, 0.8, 0.05), (1.0, 0.9, 0.0)]
    states = [
        SamplerState.create(SamplingParams(temperature=t, top_k=0, top_p=p, min_p=m), [], vocab, CPU)
        for t, p, m in settings_
    ]
    sampler = Sampler(CPU, seed=0)
    narrow, ids, warped = sampler._nucleus_candidates(logits, states)
    assert narrow == [True, True, True, False]  # the flat row's nucleus is wider: it is sorted
    reference = sampler.warp(logits, states)
    for row in range(3):
        back = torch.full((vocab,), float("-inf")).scatter(0, ids[row], warped[row])
        assert torch.equal(torch.isinf(back), torch.isinf(reference[row]))
        assert 5 < int((~torch.isinf(back)).sum()) < 256
        assert torch.allclose(torch.softmax(back, -1), torch.softmax(reference[row], -1), atol=1e-6)
    drawn = sampler.select(logits, states)
    assert all(not math.isinf(float(reference[row, drawn[row]])) for row in range(4))


# --- through the engine, against model.generate --------------------------------------------


def test_bias_and_repetition_penalty_match_generate_token_by_token(tokenizer: Any, model: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[1])
    plain = generate_ids(model, prompt, 20)
    bias = ((plain[0], -4.0), (plain[3], -2.5), (100, 3.0))
    params = greedy(20, repetition_penalty=1.3, logit_bias=bias)
    with running_engine(tokenizer, model, max_running=4) as engine:
        results = run_staggered(
            engine, [request("plain", encode(tokenizer, PROMPTS[2]), greedy(30)), request("biased", prompt, params)]
        )
    reference = generate_ids(model, prompt, 20, repetition_penalty=1.3, sequence_bias={(t,): b for t, b in bias})
    assert reference != plain
    assert results[1][1].text == tokenizer.decode(reference, skip_special_tokens=True)
    assert results[0][1].text == tokenizer.decode(
        generate_ids(model, encode(tokenizer, PROMPTS[2]), 30), skip_special_tokens=True
    )


def penalised_greedy(model: Any, prompt: list[int], n: int, presence: float, frequency: float) -> list[int]:
    """Greedy decoding with OpenAI's penalties, one full forward per token."""
    ids, generated = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        for t in set(generated):
            logits[t] -= presence + frequency * generated.count(t)
        token = int(logits.argmax())
        ids.append(token)
        generated.append(token)
        if token == 2:
            break
    return generated


def test_presence_and_frequency_penalties_token_by_token(tokenizer: Any, model: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[0])  # its plain greedy text repeats ids (29 distinct of 40)
    plain = generate_ids(model, prompt, 40)
    cases = [(0.0, 1.5), (2.0, 0.0), (0.5, 0.8)]
    with running_engine(tokenizer, model, max_running=4) as engine:
        results = run_staggered(
            engine,
            [
                request(f"p{i}", prompt, greedy(40, presence_penalty=p, frequency_penalty=f))
                for i, (p, f) in enumerate(cases)
            ],
        )
    for (presence, frequency), (_, finished) in zip(cases, results, strict=True):
        reference = penalised_greedy(model, prompt, 40, presence, frequency)
        assert reference != plain
        if frequency == 0.0:  # a presence penalty this large leaves no id twice
            assert len(set(reference)) == len(reference)
        assert finished.text == tokenizer.decode(reference, skip_special_tokens=True)


def test_logit_bias_bans_and_forces(tokenizer: Any, model: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[0])
    plain = generate_ids(model, prompt, 12)
    token = encode(tokenizer, " banana")[-1]
    with running_engine(tokenizer, model) as engine:
        banned = engine.submit(
            request("b", prompt, greedy(12, logit_bias=tuple((t, -100.0) for t in set(plain))))
        ).result()
        forced = engine.submit(
            request(
                "f", prompt, SamplingParams(max_new_tokens=5, temperature=1.0, seed=3, logit_bias=((token, 100.0),))
            )
        ).result()
        with pytest.raises(InvalidRequest, match="logit_bias token id"):
            engine.submit(request("x", prompt, greedy(3, logit_bias=((len(tokenizer) + 5, 1.0),))))
    banned_ids = encode(tokenizer, banned.text)
    assert banned.completion_tokens == 12 and not set(plain) & set(banned_ids[1:])
    assert forced.text == tokenizer.decode([token] * 5)


def test_top_k_one_and_min_p_one_sample_the_greedy_text(tokenizer: Any, model: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[2])
    greedy_text = tokenizer.decode(generate_ids(model, prompt, 16), skip_special_tokens=True)
    with running_engine(tokenizer, model, max_running=4) as engine:
        results = run_staggered(
            engine,
            [
                request("k", prompt, SamplingParams(max_new_tokens=16, temperature=1.5, top_k=1)),
                request("m", prompt, SamplingParams(max_new_tokens=16, temperature=1.5, min_p=1.0)),
                request("free", prompt, SamplingParams(max_new_tokens=16, temperature=1.5, top_k=0, seed=1)),
            ],
        )
    assert results[0][1].text == greedy_text
    assert results[1][1].text == greedy_text
    assert results[2][1].text != greedy_text


def test_seeded_request_with_every_field_ignores_its_neighbours(tokenizer: Any, model: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[1])
    seeded = SamplingParams(
        max_new_tokens=20,
        temperature=1.2,
        seed=11,
        top_k=30,
        min_p=0.02,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        repetition_penalty=1.1,
        logit_bias=((5, 2.0),),
    )
    neighbours = [
        SamplingParams(max_new_tokens=25, temperature=0.9, min_p=0.1, logit_bias=((7, 5.0),)),
        greedy(25, frequency_penalty=1.0),
        SamplingParams(max_new_tokens=25, temperature=1.0, top_k=3),
    ]
    with running_engine(tokenizer, model, max_running=4) as engine:
        alone = engine.submit(request("alone", prompt, seeded)).result()
        crowd = run_staggered(
            engine,
            [request(f"n{i}", encode(tokenizer, PROMPTS[i]), p) for i, p in enumerate(neighbours)]
            + [request("s", prompt, seeded)],
        )
        again = engine.submit(request("g", prompt, greedy(20, frequency_penalty=1.0))).result()
        again2 = engine.submit(request("g2", prompt, greedy(20, frequency_penalty=1.0))).result()
    assert crowd[-1][1].text == alone.text
    assert again.text == again2.text


def test_draws_follow_the_filtered_distribution() -> None:
    """Frequencies of 6000 draws match the probabilities; filtered (zero-probability) ids never come."""
    logits = torch.log(torch.tensor([[0.0, 0.1, 0.2, 0.0, 0.7, 0.0]])).repeat(6000, 1)
    sampler = Sampler(CPU, seed=0, top_k=0)
    states = [SamplerState.create(SamplingParams(temperature=1.0), [], 6, CPU) for _ in range(6000)]
    counts = torch.bincount(torch.tensor(sampler.select(logits, states)), minlength=6) / 6000
    assert counts[[0, 3, 5]].sum() == 0
    assert torch.allclose(counts[[1, 2, 4]], torch.tensor([0.1, 0.2, 0.7]), atol=0.03)
    top2 = [SamplerState.create(SamplingParams(temperature=1.0, top_k=2), [], 6, CPU) for _ in range(6000)]
    counts = torch.bincount(torch.tensor(sampler.select(logits, top2)), minlength=6) / 6000
    assert torch.allclose(counts, torch.tensor([0.0, 0.0, 0.2 / 0.9, 0.0, 0.7 / 0.9, 0.0]), atol=0.03)
