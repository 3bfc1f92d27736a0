"""BatchEngine on tiny random float32 models: batched output equals solo ``model.generate``.

Requests join a running batch at different times, from asyncio and from threads; sampling,
stop conditions, cancellation, overload, failures and shutdown are checked from what a caller
sees (stream events, ``stats()``, exceptions).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from llm_server.engine import cpu_kernels
from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import (
    ContextLengthExceeded,
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
    TextDelta,
)

PROMPTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Once upon a time",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23",
    "Écrivez une phrase en français, s'il vous plaît.",
]


def build_model(vocab_size: int, kind: str = "llama", seed: int = 0) -> Any:
    """A tiny random model whose greedy output depends on its context (weights init 0.2)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind == "gpt2":  # no compact forward: exercises the fallback runner
        config: Any = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=1024, initializer_range=0.2, **common)
        return GPT2LMHeadModel(config).eval()
    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
        **common,
    )
    if kind == "qwen2":  # q/k/v biases, untied head
        model: Any = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **shape))
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.2)
        return model.eval()
    return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **shape)).eval()


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    return build_model(len(tokenizer))


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def generate_ids(model: Any, prompt_ids: list[int], max_new_tokens: int, **kwargs: Any) -> list[int]:
    """``model.generate`` for one request alone: the reference the engine must reproduce."""
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=2,
            **kwargs,
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def reference_text(tokenizer: Any, model: Any, prompt_ids: list[int], max_new_tokens: int, **kwargs: Any) -> str:
    return str(tokenizer.decode(generate_ids(model, prompt_ids, max_new_tokens, **kwargs), skip_special_tokens=True))


def greedy(max_new_tokens: int, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


def request(rid: str, prompt_ids: list[int], params: SamplingParams) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_ids=prompt_ids, params=params)


@contextmanager
def running_engine(tokenizer: Any, model: Any, **config: Any) -> Iterator[BatchEngine]:
    engine = BatchEngine(tokenizer, model, "tiny", EngineConfig(**config))
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown(timeout_s=10)


async def consume(
    stream: GenerationStream, started: asyncio.Event | None = None, after: int = 3
) -> tuple[list[str], Finished]:
    """All deltas and the Finished event of a stream; sets ``started`` after ``after`` deltas."""
    deltas: list[str] = []
    async for event in stream:
        if isinstance(event, TextDelta):
            deltas.append(event.text)
            if started is not None and len(deltas) >= after:
                started.set()
        else:
            if started is not None:
                started.set()
            return deltas, event
    raise AssertionError("stream ended without Finished")


def first_delta(stream: GenerationStream) -> Iterator[Any]:
    """Wait until ``stream`` is generating; return its live iterator (dropping it would cancel)."""
    events = iter(stream)
    assert isinstance(next(events), TextDelta)
    return events


def run_staggered(engine: BatchEngine, requests: list[GenerationRequest]) -> list[tuple[list[str], Finished]]:
    """Submit each request once the previous one is streaming, so they join a running batch."""

    async def scenario() -> list[tuple[list[str], Finished]]:
        tasks = []
        for req in requests:
            started = asyncio.Event()
            tasks.append(asyncio.create_task(consume(engine.submit(req), started)))
            await started.wait()
        return list(await asyncio.gather(*tasks))

    return asyncio.run(scenario())


# --- correctness against model.generate ---------------------------------------------------


@pytest.mark.parametrize(("kind", "fused"), [("llama", True), ("llama", False), ("qwen2", True), ("gpt2", True)])
def test_greedy_in_a_batch_equals_generate_alone(
    tokenizer: Any, kind: str, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fused``: LlamaRunner's small steps in its fused CPU kernels (the default) or in PyTorch ops."""
    if not fused:
        monkeypatch.setattr(cpu_kernels, "FUSED_MAX_ROWS", 0)
    model = build_model(len(tokenizer), kind)
    prompts = [encode(tokenizer, p) for p in PROMPTS]
    budgets = [30, 12, 25, 18, 30]
    with running_engine(tokenizer, model, max_running=4) as engine:
        assert engine.runner_name == ("GenericRunner" if kind == "gpt2" else "LlamaRunner")
        requests = [request(f"r{i}", p, greedy(n)) for i, (p, n) in enumerate(zip(prompts, budgets, strict=True))]
        results = run_staggered(engine, requests)
    for prompt, budget, (deltas, finished) in zip(prompts, budgets, results, strict=True):
        reference = generate_ids(model, prompt, budget)
        assert finished.text == tokenizer.decode(reference, skip_special_tokens=True)
        assert "".join(deltas) == finished.text
        assert finished.completion_tokens == len(reference)
        assert finished.prompt_tokens == len(prompt)


def test_greedy_on_the_shared_tiny_fixture(tokenizer: Any, tiny_model: Any) -> None:
    prompts = [encode(tokenizer, p) for p in PROMPTS[:3]]
    with running_engine(tokenizer, tiny_model) as engine:
        results = run_staggered(engine, [request(f"r{i}", p, greedy(16)) for i, p in enumerate(prompts)])
    for prompt, (_, finished) in zip(prompts, results, strict=True):
        assert finished.text == reference_text(tokenizer, tiny_model, prompt, 16)


def test_long_prompt_prefilled_in_chunks_equals_generate(tokenizer: Any, model: Any) -> None:
    long_prompt = encode(tokenizer, " ".join(f"word{i}" for i in range(120)))
    short = encode(tokenizer, PROMPTS[2])
    assert len(long_prompt) > 200
    with running_engine(tokenizer, model, prefill_chunk_tokens=64) as engine:
        results = run_staggered(engine, [request("short", short, greedy(40)), request("long", long_prompt, greedy(20))])
    assert results[0][1].text == reference_text(tokenizer, model, short, 40)
    assert results[1][1].text == reference_text(tokenizer, model, long_prompt, 20)


def test_repetition_penalty_matches_generate(tokenizer: Any, model: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[1])
    with running_engine(tokenizer, model) as engine:
        finished = engine.submit(request("p", prompt, greedy(30, repetition_penalty=1.5))).result()
    assert finished.text == reference_text(tokenizer, model, prompt, 30, repetition_penalty=1.5)


def test_sequences_leaving_the_batch_do_not_disturb_the_others(tokenizer: Any, model: Any) -> None:
    """Short requests finish first (their slots are reused) while long ones keep decoding."""
    prompts = [encode(tokenizer, p) for p in PROMPTS]
    budgets = [5, 40, 3, 40, 8]

    async def scenario(engine: BatchEngine) -> list[tuple[list[str], Finished]]:
        pairs = enumerate(zip(prompts, budgets, strict=True))
        streams = [engine.submit(request(f"r{i}", p, greedy(n))) for i, (p, n) in pairs]
        return list(await asyncio.gather(*(consume(s) for s in streams)))

    with running_engine(tokenizer, model, max_running=3) as engine:
        results = asyncio.run(scenario(engine))
    for prompt, budget, (_, finished) in zip(prompts, budgets, results, strict=True):
        assert finished.text == reference_text(tokenizer, model, prompt, budget)


# --- sampling -------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(tokenizer: Any, model: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[2])
    seeded = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    with running_engine(tokenizer, model) as engine:
        alone = engine.submit(request("a", prompt, seeded)).result().text
        again = engine.submit(request("b", prompt, seeded)).result().text
        others = [
            request(f"o{i}", encode(tokenizer, p), SamplingParams(max_new_tokens=24)) for i, p in enumerate(PROMPTS)
        ]
        batch = run_staggered(engine, [others[0], request("c", prompt, seeded), *others[1:]])
        reseeded = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=99)
        other_seed = engine.submit(request("d", prompt, reseeded)).result()
    assert alone == again == batch[1][1].text
    assert other_seed.text != alone


def test_sampling_settings_are_per_request(tokenizer: Any, model: Any) -> None:
    """A greedy request is unaffected by sampled neighbours with other temperatures and top_p."""
    prompts = [encode(tokenizer, p) for p in PROMPTS[:4]]
    params = [
        greedy(20),
        SamplingParams(max_new_tokens=20, temperature=1.5, top_p=0.5),
        SamplingParams(max_new_tokens=20, temperature=0.0),  # temperature 0 is greedy too
        SamplingParams(max_new_tokens=20, temperature=0.3, repetition_penalty=1.2, seed=5),
    ]
    with running_engine(tokenizer, model) as engine:
        pairs = enumerate(zip(prompts, params, strict=True))
        results = run_staggered(engine, [request(f"r{i}", p, s) for i, (p, s) in pairs])
    assert results[0][1].text == reference_text(tokenizer, model, prompts[0], 20)
    assert results[2][1].text == reference_text(tokenizer, model, prompts[2], 20)
    assert all(f.completion_tokens == 20 for _, f in results)


# --- stop conditions ------------------------------------------------------------------------


def test_max_new_tokens_finishes_with_length(tokenizer: Any, model: Any) -> None:
    with running_engine(tokenizer, model) as engine:
        finished = engine.submit(request("l", encode(tokenizer, "Hello"), greedy(7))).result()
    assert finished.reason == "length" and finished.completion_tokens == 7


def test_eos_from_generation_config_finishes_with_stop(tokenizer: Any, model: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[3])
    reference = generate_ids(model, prompt, 30)
    eos = reference[9]
    cut = reference.index(eos)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [2, eos]
    try:
        with running_engine(tokenizer, model) as engine:
            finished = engine.submit(request("e", prompt, greedy(30))).result()
    finally:
        model.generation_config.eos_token_id = saved
    assert finished.reason == "stop"
    assert finished.completion_tokens == cut + 1  # the end-of-sequence token counts, its text does not
    assert finished.text == tokenizer.decode(reference[:cut], skip_special_tokens=True)


def test_stop_string_ends_the_text_before_it(tokenizer: Any, model: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[1])
    full = reference_text(tokenizer, model, prompt, 40)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    with running_engine(tokenizer, model) as engine:
        stream = engine.submit(request("s", prompt, greedy(40, stop=("never-there", stop))))
        deltas, finished = asyncio.run(consume(stream))
    assert finished.reason == "stop"
    assert finished.text == expected == "".join(deltas)


def test_zero_new_tokens_and_context_limit(tokenizer: Any, model: Any) -> None:
    with running_engine(tokenizer, model, max_total_tokens=64) as engine:
        assert engine.max_context == 64
        finished = engine.submit(request("z", encode(tokenizer, "Hi"), greedy(0))).result()
        assert (finished.reason, finished.completion_tokens, finished.text) == ("length", 0, "")
        with pytest.raises(ContextLengthExceeded):
            engine.submit(request("big", [5] * 60, greedy(10)))


# --- cancellation, overload, failures -------------------------------------------------------


def test_cancelling_one_request_leaves_the_others_unchanged(tokenizer: Any, model: Any) -> None:
    prompts = [encode(tokenizer, p) for p in PROMPTS[:3]]

    async def scenario(engine: BatchEngine) -> tuple[list[Finished], Finished]:
        streams = [engine.submit(request(f"r{i}", p, greedy(40))) for i, p in enumerate(prompts)]
        victim = engine.submit(request("victim", encode(tokenizer, PROMPTS[4]), greedy(500)))
        tasks = [asyncio.create_task(consume(s)) for s in streams]
        seen = 0
        async for event in victim:
            seen += isinstance(event, TextDelta)
            if seen == 3:
                victim.cancel()
            if isinstance(event, Finished):
                cancelled = event
        results = await asyncio.gather(*tasks)
        return [f for _, f in results], cancelled

    with running_engine(tokenizer, model) as engine:
        finished, cancelled = asyncio.run(scenario(engine))
        assert engine.stats().running == 0
    assert cancelled.reason == "cancelled" and cancelled.completion_tokens < 500
    for prompt, result in zip(prompts, finished, strict=True):
        assert result.text == reference_text(tokenizer, model, prompt, 40)


def test_cancel_frees_the_slot_for_a_waiting_request(tokenizer: Any, model: Any) -> None:
    with running_engine(tokenizer, model, max_running=1) as engine:
        hog = engine.submit(request("hog", encode(tokenizer, "Hi"), greedy(900)))
        hog_events = first_delta(hog)
        waiting = engine.submit(request("next", encode(tokenizer, PROMPTS[2]), greedy(10)))
        assert engine.stats().waiting == 1
        hog.cancel()
        assert waiting.result().completion_tokens == 10
        assert list(hog_events)[-1].reason == "cancelled"


def test_abandoned_iteration_cancels_the_request(tokenizer: Any, model: Any) -> None:
    async def scenario(engine: BatchEngine) -> GenerationStream:
        stream = engine.submit(request("a", encode(tokenizer, "Hi"), greedy(900)))
        async for _ in stream:
            break  # the consumer goes away
        return stream

    with running_engine(tokenizer, model) as engine:
        stream = asyncio.run(scenario(engine))
        assert stream.cancelled
        follow_up = engine.submit(request("b", encode(tokenizer, "Hello"), greedy(5))).result()
        assert follow_up.completion_tokens == 5 and engine.stats().running == 0


def test_full_queue_raises_overloaded(tokenizer: Any, model: Any) -> None:
    with running_engine(tokenizer, model, max_running=1, max_waiting=1, retry_after_s=3) as engine:
        running = engine.submit(request("run", encode(tokenizer, "Hi"), greedy(900)))
        running_events = first_delta(running)
        queued = engine.submit(request("queued", encode(tokenizer, "Hi"), greedy(900)))
        with pytest.raises(EngineOverloaded) as raised:
            engine.submit(request("refused", encode(tokenizer, "Hi"), greedy(5)))
        assert raised.value.retry_after_s == 3
        assert engine.stats().waiting == 1 and engine.stats().running == 1
        running.cancel()
        queued.cancel()
        assert list(running_events)[-1].reason == "cancelled"


class PoisonedTokenizer:
    """The real tokenizer, except that decoding text that contains ``poison`` raises."""

    backend_tokenizer = None  # no byte table: the engine decodes through ``decode``

    def __init__(self, inner: Any, poison: int) -> None:
        self._inner, self._poison = inner, poison

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        if self._poison in ids:
            raise ValueError("injected failure")
        return str(self._inner.decode(ids, **kwargs))


def test_error_in_one_request_fails_only_that_request(tokenizer: Any, model: Any) -> None:
    """A request whose text cannot be decoded mid-generation, one whose seed is out of range,
    and prompts the engine refuses at submit: each fails alone, the others match ``generate``."""
    prompts = [encode(tokenizer, p) for p in PROMPTS[:3]]
    bad_prompt = encode(tokenizer, PROMPTS[3])
    references = [generate_ids(model, p, 25) for p in prompts]
    seen = {t for ids in [*prompts, *references] for t in ids}
    poison = next(t for t in generate_ids(model, bad_prompt, 25)[4:] if t not in seen)
    with running_engine(PoisonedTokenizer(tokenizer, poison), model) as engine:
        with pytest.raises(InvalidRequest, match="outside the vocabulary"):
            engine.submit(request("bad-ids", [5, len(tokenizer) + 10], greedy(5)))
        with pytest.raises(InvalidRequest, match="empty"):
            engine.submit(request("empty", [], greedy(5)))

        async def scenario() -> list[Any]:
            streams = [engine.submit(request(f"r{i}", p, greedy(25))) for i, p in enumerate(prompts)]
            streams.insert(1, engine.submit(request("bad", bad_prompt, greedy(25))))
            overflow = SamplingParams(max_new_tokens=5, temperature=1.0, seed=2**70)
            streams.append(engine.submit(request("bad-seed", prompts[0], overflow)))
            return await asyncio.gather(*(consume(s) for s in streams), return_exceptions=True)

        results = asyncio.run(scenario())
        assert engine.stats().healthy and engine.stats().running == 0
    bad, bad_seed = results.pop(1), results.pop()
    assert isinstance(bad, EngineError) and "injected failure" in str(bad)
    assert isinstance(bad_seed, EngineError)
    for reference, (_, finished) in zip(references, results, strict=True):
        assert finished.text == tokenizer.decode(reference, skip_special_tokens=True)


def test_fatal_error_fails_every_pending_request(tokenizer: Any) -> None:
    """The model itself fails in a decode step (no request to blame): every request fails."""
    model = build_model(len(tokenizer), "gpt2")  # its runner calls the model's own forward
    broken = threading.Event()

    def device_lost(*args: Any) -> None:
        if broken.is_set():
            raise RuntimeError("device lost")

    model.register_forward_pre_hook(device_lost)
    with running_engine(tokenizer, model, max_running=2) as engine:
        streams = [engine.submit(request(f"r{i}", encode(tokenizer, p), greedy(900))) for i, p in enumerate(PROMPTS)]
        events = first_delta(streams[0])
        second = first_delta(streams[1])  # both running requests decode: the next forward is a decode step
        broken.set()
        with pytest.raises(EngineError, match="device lost"):
            list(second)
        with pytest.raises(EngineError, match="device lost"):
            list(events)
        for stream in streams[2:]:  # the waiting ones
            with pytest.raises(EngineError, match="device lost"):
                stream.result()
        stats = engine.stats()
        assert not stats.healthy and stats.running == 0 and stats.waiting == 0
        with pytest.raises(EngineUnavailable):
            engine.submit(request("late", encode(tokenizer, "Hi"), greedy(5)))


# --- consumers and lifecycle ----------------------------------------------------------------


def test_streams_consumed_from_threads(tokenizer: Any, model: Any) -> None:
    prompts = [encode(tokenizer, p) for p in PROMPTS[:4]]
    results: dict[int, tuple[list[str], Finished]] = {}

    def worker(i: int, stream: GenerationStream) -> None:
        deltas = []
        for event in stream:
            if isinstance(event, TextDelta):
                deltas.append(event.text)
            else:
                results[i] = (deltas, event)

    with running_engine(tokenizer, model) as engine:
        threads = [
            threading.Thread(target=worker, args=(i, engine.submit(request(f"t{i}", p, greedy(20)))))
            for i, p in enumerate(prompts)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    for i, prompt in enumerate(prompts):
        deltas, finished = results[i]
        assert "".join(deltas) == finished.text == reference_text(tokenizer, model, prompt, 20)


def test_shutdown_drains_running_requests_then_refuses(tokenizer: Any, model: Any) -> None:
    engine = BatchEngine(tokenizer, model, "tiny", EngineConfig())
    with pytest.raises(EngineUnavailable):
        engine.submit(request("early", encode(tokenizer, "Hi"), greedy(5)))
    engine.start()
    assert engine.stats().ready
    streams = [engine.submit(request(f"r{i}", encode(tokenizer, p), greedy(30))) for i, p in enumerate(PROMPTS[:3])]
    engine.shutdown(timeout_s=60)
    assert all(s.result().reason == "length" for s in streams)
    assert not engine.stats().ready
    with pytest.raises(EngineUnavailable):
        engine.submit(request("late", encode(tokenizer, "Hi"), greedy(5)))


def test_shutdown_timeout_fails_what_is_left(tokenizer: Any, model: Any) -> None:
    engine = BatchEngine(tokenizer, model, "tiny", EngineConfig(max_running=1))
    engine.start()
    streams = [engine.submit(request(f"r{i}", encode(tokenizer, "Hi"), greedy(900))) for i in range(3)]
    engine.shutdown(timeout_s=0.01)
    for stream in streams:
        with pytest.raises(EngineUnavailable):
            stream.result()


def test_top_k_and_top_p_filters_restrict_sampling(tokenizer: Any, model: Any) -> None:
    """top_k=1 (engine-wide) or a tiny top_p leave only the most likely id: sampling == greedy."""
    prompt = encode(tokenizer, PROMPTS[1])
    expected = reference_text(tokenizer, model, prompt, 20)
    with running_engine(tokenizer, model, top_k=1) as engine:
        sampled = SamplingParams(max_new_tokens=20, temperature=1.0)
        assert engine.submit(request("k", prompt, sampled)).result().text == expected
    with running_engine(tokenizer, model, top_k=0) as engine:
        tiny_p = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=1e-6)
        assert engine.submit(request("p", prompt, tiny_p)).result().text == expected


def most_running_at_once(results: list[Finished]) -> int:
    """From each request's timeline: the most requests admitted and not yet finished at once."""
    spans = [(f.timeline["prefilling"], f.timeline["finished"]) for f in results]
    return max(sum(1 for start, end in spans if start <= at < end) for at, _ in spans)


def test_kv_budget_limits_how_many_requests_run_together(tokenizer: Any, model: Any) -> None:
    """Each request reserves prompt + max_new_tokens; 3 x 60 > 150, so at most 2 run at once."""
    prompt = [5] * 10
    with running_engine(tokenizer, model, max_running=4, max_total_tokens=150) as engine:
        engine.eos_ids = frozenset()  # every request runs its full budget
        streams = [engine.submit(request(f"b{i}", prompt, greedy(50))) for i in range(4)]
        results = [s.result() for s in streams]
    assert [r.reason for r in results] == ["length"] * 4
    assert most_running_at_once(results) == 2


def test_admission_is_bounded_by_the_kv_budget_not_a_small_constant(tokenizer: Any, model: Any) -> None:
    """With the default max_running, 24 short requests all run together (a budget-bound batch)."""
    assert EngineConfig().max_running >= 24
    with running_engine(tokenizer, model) as engine:
        engine.eos_ids = frozenset()
        streams = [engine.submit(request(f"c{i}", [5, 6, 7], greedy(40))) for i in range(24)]
        results = [s.result() for s in streams]
    assert most_running_at_once(results) == 24
    for finished in results:
        timeline = finished.timeline
        assert timeline["waiting"] <= timeline["prefilling"] <= timeline["decoding"] <= timeline["finished"]


def test_one_event_loop_wake_up_per_step_not_per_token(tokenizer: Any, model: Any) -> None:
    """8 requests x 12 tokens stream ~100 events; their consumers' loop is woken once per forward."""

    async def scenario(engine: BatchEngine) -> int:
        loop = asyncio.get_running_loop()
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        streams = [engine.submit(request(f"w{i}", [5, 6, 7 + i], greedy(12))) for i in range(8)]
        results = await asyncio.gather(*(consume(s) for s in streams))
        assert all(f.completion_tokens == 12 for _, f in results)
        return wakeups

    with running_engine(tokenizer, model) as engine:
        engine.eos_ids = frozenset()
        wakeups = asyncio.run(scenario(engine))
    assert 0 < wakeups <= 12 + 2 * 8  # one per forward (12 decode steps, up to 8 prefills), not ~104
