"""GenericRunner, family by family: batched greedy output equals ``model.generate`` alone.

Each family is a tiny random float32 model built from its transformers config class
(``benchmarks/tiny_models.py``: 2 layers, hidden 64, vocab 128, seeded, no download). Prompts of
mixed lengths are prefilled together and decoded as one batch; one sequence is cancelled (its cache
released) mid-batch and a new one joins in its slot while the others decode. A family the installed
transformers lacks is skipped, saying so.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import tiny_models  # noqa: E402

from llm_server.engine.generic_runner import GenericRunner, generic_unsupported_reason  # noqa: E402
from llm_server.engine.hf_linears import EngineLinear, replace_linears  # noqa: E402
from llm_server.engine.hf_runner import HFRunner  # noqa: E402
from llm_server.engine.llama_runner import LlamaRunner  # noqa: E402
from llm_server.engine.model_setup import make_runner  # noqa: E402
from llm_server.engine.runner import KVHandle, ModelRunner  # noqa: E402

EOS = 2
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]]
JOINER = [30, 31, 32, 33, 34, 35]  # joins in the cancelled sequence's slot
NEW_TOKENS = 12
CANCEL_AT = 4  # decode steps before PROMPTS[1] is cancelled and JOINER joins


def tiny(family: str, **kwargs: Any) -> Any:
    reason = tiny_models.available(family)
    if reason is not None:
        pytest.skip(f"{family}: {reason}")
    return tiny_models.build(family, **kwargs)


def reference(model: Any, prompt: list[int], n: int) -> list[int]:
    """Greedy ``model.generate`` alone (stops after EOS)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return [int(t) for t in out[0, len(prompt):]]


def until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


class Batch:
    """Sequences decoded together by one runner, greedy, as the engine drives it."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.handles: dict[str, KVHandle] = {}
        self.out: dict[str, list[int]] = {}

    def prefill(self, prompts: dict[str, list[int]]) -> None:
        handles = [self.runner.open() for _ in prompts]
        logits = self.runner.forward(handles, list(prompts.values()))
        for name, handle, row in zip(prompts, handles, logits, strict=True):
            self.handles[name], self.out[name] = handle, [int(row.argmax())]

    def decode(self) -> None:
        names = list(self.handles)
        logits = self.runner.forward([self.handles[n] for n in names], [[self.out[n][-1]] for n in names])
        for name, row in zip(names, logits, strict=True):
            self.out[name].append(int(row.argmax()))

    def cancel(self, name: str) -> None:
        self.runner.release(self.handles.pop(name))


@pytest.mark.parametrize("family", list(tiny_models.FAMILIES))
def test_batched_greedy_equals_generate(family: str) -> None:
    model = tiny(family)
    expected = [reference(model, p, NEW_TOKENS) for p in PROMPTS]
    expected_joiner = reference(model, JOINER, NEW_TOKENS)
    runner = GenericRunner(model, max_slots=4, max_context=256)
    batch = Batch(runner)
    batch.prefill({str(i): p for i, p in enumerate(PROMPTS)})
    for _ in range(CANCEL_AT):
        batch.decode()
    batch.cancel("1")  # cancelled mid-batch: its slot is freed and taken by the joiner
    batch.prefill({"joiner": JOINER})
    for _ in range(NEW_TOKENS - 1 - CANCEL_AT):
        batch.decode()
    for _ in range(CANCEL_AT):  # the joiner's last tokens (the others run on past their budget)
        batch.decode()
    assert until_eos(batch.out["0"][:NEW_TOKENS]) == expected[0]
    assert until_eos(batch.out["2"][:NEW_TOKENS]) == expected[2]
    assert until_eos(batch.out["joiner"]) == expected_joiner
    assert batch.out["1"] == expected[1][: CANCEL_AT + 1]


@pytest.mark.parametrize("family", list(tiny_models.FAMILIES))
def test_make_runner_serves_every_family_batched(family: str) -> None:
    model = tiny(family)
    runner = make_runner(model, max_slots=4, max_context=256)
    assert isinstance(runner, (GenericRunner, LlamaRunner)), runner.reason
    assert runner.reason


def test_sliding_window_changes_the_output() -> None:
    """The window is in the mask: the same weights without it generate something else."""
    windowed = tiny("mistral")
    full = tiny("mistral")
    full.config.sliding_window = None
    prompt = PROMPTS[2]
    assert reference(windowed, prompt, NEW_TOKENS) != reference(full, prompt, NEW_TOKENS)
    batch = Batch(GenericRunner(windowed, max_slots=2, max_context=256))
    batch.prefill({"p": prompt})
    for _ in range(NEW_TOKENS - 1):
        batch.decode()
    assert until_eos(batch.out["p"]) == reference(windowed, prompt, NEW_TOKENS)


def test_chunked_prefill_over_the_cache_equals_generate() -> None:
    model = tiny("gemma3")
    prompt = list(range(3, 40))
    expected = reference(model, prompt, 6)
    runner = GenericRunner(model, max_slots=2, max_context=256)
    handle = runner.open()
    for start in range(0, len(prompt), 10):  # the engine's prefill chunks
        logits = runner.forward([handle], [prompt[start : start + 10]])
    out = [int(logits[0].argmax())]
    for _ in range(5):
        out.append(int(runner.forward([handle], [[out[-1]]])[0].argmax()))
    assert until_eos(out) == expected


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantization_applies_to_any_family(mode: str) -> None:
    """Weight-only int8/int4 replaces the linears of a non-Llama model; its greedy output stays close."""
    model = tiny("qwen3")
    with torch.no_grad():
        expected = model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    runner = GenericRunner(model, max_slots=2, max_context=256, quantization=mode, pack_weights=False)
    kinds = {name: type(m.kernel).__name__ for name, m in model.named_modules() if isinstance(m, EngineLinear)}
    assert kinds["lm_head"] == "Int8Linear"  # the head is int8 in both modes
    quantized = "Int8Linear" if mode == "int8" else "Int4Linear"
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert kinds[f"model.layers.1.{name}"] == quantized
    assert kinds["model.layers.1.self_attn.k_proj"] == quantized  # fused with q and v
    got = runner.forward([runner.open()], [PROMPTS[0]])[0]
    error = float((got - expected).norm() / expected.norm())
    assert 0 < error < (0.05 if mode == "int8" else 0.35)  # a broken linear: ~1


@pytest.mark.parametrize("mode", ["auto", "int4", None])
def test_both_runners_report_the_rows_auto_serves_from_its_int4_copy(mode: str | None) -> None:
    """``fast_tokens`` (speculation keeps a lone row's step within it) is the row switch of the layers'
    linears under ``auto`` (8; the LM head's int8 limit of 2 left out), whatever the runner and
    whether the fused kernels are on; no bound in the other modes."""
    from llm_server.engine.quant import AUTO_MAX_SMALL_ROWS

    expected = AUTO_MAX_SMALL_ROWS if mode == "auto" else None
    generic = GenericRunner(tiny("qwen3"), max_slots=2, max_context=256, quantization=mode)
    llama = LlamaRunner(tiny("llama"), max_slots=2, max_context=256, quantization=mode, fused_kernels=False)
    assert generic.fast_tokens == llama.fast_tokens == expected


def test_replace_linears_fuses_siblings_keeps_routers_float_and_recomputes_for_a_new_input() -> None:
    torch.manual_seed(0)
    block = torch.nn.Module()
    for name, width in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32), ("gate", 4)):
        setattr(block, name, torch.nn.Linear(64, width))
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        want = {(n, i): getattr(block, n)(t) for n in ("q_proj", "k_proj", "v_proj") for i, t in enumerate((x, y))}
    replace_linears(block, pack=False, quantization="int8", head_quantization=None, free=False)
    modules = {n: getattr(block, n) for n in ("q_proj", "k_proj", "v_proj", "gate")}
    assert all(isinstance(m, EngineLinear) for m in modules.values())
    assert modules["q_proj"].kernel is modules["v_proj"].kernel  # one fused int8 matmul
    assert type(modules["q_proj"].kernel).__name__ == "Int8Linear"
    assert type(modules["gate"].kernel).__name__ == "FloatLinear"  # a router stays float
    with torch.no_grad():
        q = block.q_proj(x)
        k_other = block.k_proj(y)  # another input: computed for y, not the cached result for x
        x.mul_(2.0)  # modified in place after q: v must see the new values
        v = block.v_proj(x)
    assert torch.allclose(q, want["q_proj", 0], atol=0.05)
    assert torch.allclose(k_other, want["k_proj", 1], atol=0.05)
    v_bias = block.v_proj.kernel.bias[-32:]
    assert torch.allclose(v, 2.0 * (want["v_proj", 0] - v_bias) + v_bias, atol=0.1)


def test_models_that_cannot_run_batched_keep_the_fallback_and_say_why() -> None:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4)).eval()
    assert generic_unsupported_reason(mamba) is not None
    with pytest.raises(ValueError):
        GenericRunner(mamba, max_slots=2, max_context=64)
    runner = make_runner(mamba, max_slots=2, max_context=64)
    assert isinstance(runner, HFRunner)
    assert "one sequence at a time" in runner.reason and "attention interface" in runner.reason


def test_attention_outside_the_engine_is_refused_clearly() -> None:
    from llm_server.engine import batched_attention

    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(RuntimeError, match="only inside the engine"):
        batched_attention.batched_attention(torch.nn.Module(), q, q, q, None)


def test_the_model_still_generates_on_its_own_after_the_runner() -> None:
    """The attention implementation is switched only during the engine's forward."""
    model = tiny("qwen3")
    expected = reference(model, PROMPTS[0], 6)
    GenericRunner(model, max_slots=2, max_context=256)
    assert model.config._attn_implementation != "llm_server_batched"
    assert reference(model, PROMPTS[0], 6) == expected
