"""The quantized weights a decode step streams, moved into one buffer advised for 2 MB pages.

What a user relies on: the move changes no value (a runner's logits are bit-identical with and
without it, Llama and another family), every holder of a weight reads the moved copy (the fused
body's pointer table too: built after the move, or it would read freed memory), and
``LLM_SERVER_WEIGHT_ARENA=0`` leaves the weights where they were."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import tiny_models  # noqa: E402

from llm_server.engine import weight_arena  # noqa: E402
from llm_server.engine.generic_runner import GenericRunner  # noqa: E402
from llm_server.engine.hf_linears import streamed_linears  # noqa: E402
from llm_server.engine.llama_runner import LlamaRunner  # noqa: E402
from llm_server.engine.quant import make_linear, streamed_tensors  # noqa: E402
from llm_server.engine.weight_arena import ALIGN, HUGE_PAGE, WeightArena, pack_streamed  # noqa: E402
from tests.test_engine_batching import build_model  # noqa: E402

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13]


def _span(arena: WeightArena) -> tuple[int, int]:
    start = torch.frombuffer(arena.mapping, dtype=torch.uint8).data_ptr()
    return start, start + len(arena.mapping)


def _inside(tensor: torch.Tensor, arena: WeightArena) -> bool:
    low, high = _span(arena)
    return low <= tensor.data_ptr() and tensor.data_ptr() + tensor.numel() * tensor.element_size() <= high


def test_tensors_keep_their_values_and_move_in_order_aligned_once_each() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 255, (1000,), dtype=torch.uint8, generator=generator)
    b = torch.randn(3, 7, generator=generator).to(torch.bfloat16)
    c = torch.randn(5, generator=generator)
    strided = torch.randn(4, 6, generator=generator).t()  # not contiguous: left where it is
    view = torch.randn(8, 8, generator=generator).view(64)  # its base would keep the old copy alive
    before = [t.clone() for t in (a, b, c, strided, view)]
    left = [strided.data_ptr(), view.data_ptr()]
    packed = torch.randn(4, 4, generator=generator).to_mkldnn()  # oneDNN's opaque layout: no storage to move
    arena = pack_streamed([a, b, a, c, strided, view, packed])
    assert arena is not None and arena.tensors == 3  # ``a`` twice, moved once
    for tensor, value in zip((a, b, c, strided, view), before, strict=True):
        assert torch.equal(tensor, value) and tensor.dtype == value.dtype and tensor.shape == value.shape
    assert all(_inside(t, arena) for t in (a, b, c)) and [strided.data_ptr(), view.data_ptr()] == left
    assert packed.layout == torch._mkldnn
    assert a.data_ptr() % HUGE_PAGE == 0  # the first on a 2 MB boundary
    assert a.data_ptr() < b.data_ptr() < c.data_ptr()  # in the order given
    assert all(t.data_ptr() % ALIGN == 0 for t in (a, b, c))
    a.add_(1)  # the moved copy is the tensor's own storage: writable, the values follow
    assert torch.equal(a, before[0] + 1)


def test_nothing_to_move_and_the_switch_off_leave_everything_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pack_streamed([]) is None
    weight = torch.randn(8, 64)
    at = weight.data_ptr()
    monkeypatch.setenv(weight_arena.DISABLE_ENV, "0")
    assert pack_streamed([weight]) is None and weight.data_ptr() == at


def test_without_huge_pages_or_anonymous_mappings_the_weights_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.randn(8, 64)
    value = weight.clone()
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)  # a platform without madvise's huge pages
    arena = pack_streamed([weight])
    assert arena is not None and not arena.huge_pages and _inside(weight, arena) and torch.equal(weight, value)
    other = torch.randn(8, 64)
    at = other.data_ptr()
    monkeypatch.delattr(mmap, "MAP_ANONYMOUS")  # no anonymous mappings at all: left where they are
    assert pack_streamed([other]) is None and other.data_ptr() == at


@pytest.mark.parametrize("mode", ["int8", "int4", "auto"])
def test_every_quantized_linear_names_what_a_step_of_few_rows_reads(mode: str) -> None:
    weight = torch.randn(64, 128) * 0.05
    linear = make_linear(weight, None, False, mode)
    streamed = streamed_tensors(linear)
    assert streamed and sum(t.numel() * t.element_size() for t in streamed) == linear.weight_bytes
    assert all(t._base is None for t in streamed)  # no view: moving them frees the old copies
    assert streamed_tensors(make_linear(weight, None, False, None)) == []  # float weights stay


def _llama_logits(runner: LlamaRunner) -> torch.Tensor:
    handle = runner.open()
    first = runner.forward([handle], [PROMPT])
    steps = [runner.forward([handle], [[token]]) for token in (20, 21, 22)]  # decode steps: the fused body
    return torch.cat([first, *steps])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int4", "auto"])
def test_a_llama_runner_reads_its_weights_from_the_arena_and_computes_the_same(
        monkeypatch: pytest.MonkeyPatch, mode: str, dtype: torch.dtype) -> None:
    model = build_model(128).to(dtype)
    monkeypatch.setenv(weight_arena.DISABLE_ENV, "0")
    plain = LlamaRunner(model, max_slots=2, max_context=128, quantization=mode)
    monkeypatch.delenv(weight_arena.DISABLE_ENV)
    packed = LlamaRunner(model, max_slots=2, max_context=128, quantization=mode)
    assert plain._arena is None and packed._arena is not None
    linears = [*packed._linears(), packed._lm_head]
    assert all(_inside(t, packed._arena) for lin in linears for t in streamed_tensors(lin))
    assert packed._arena.tensors == sum(len(streamed_tensors(lin)) for lin in linears)
    body = packed._body
    if body is not None:  # VNNI machines: the fused body's own pointers lead into the arena
        low, high = _span(packed._arena)
        linear_pointers = [body._table[i * 10 + k] for i in range(body.layers) for k in range(8)]
        assert all(low <= p < high for p in linear_pointers)
    with torch.inference_mode():
        assert torch.equal(_llama_logits(packed), _llama_logits(plain))


def test_another_family_is_packed_too_and_computes_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    reason = tiny_models.available("qwen3")
    if reason is not None:
        pytest.skip(reason)

    def logits(runner: GenericRunner) -> torch.Tensor:
        handle = runner.open()
        first = runner.forward([handle], [PROMPT])
        return torch.cat([first, runner.forward([handle], [[20]])])

    def build() -> Any:
        return tiny_models.build("qwen3")

    monkeypatch.setenv(weight_arena.DISABLE_ENV, "0")
    plain = GenericRunner(build(), max_slots=2, max_context=128, quantization="int4")
    monkeypatch.delenv(weight_arena.DISABLE_ENV)
    model = build()
    packed = GenericRunner(model, max_slots=2, max_context=128, quantization="int4")
    assert packed._arena is not None
    streamed = [t for linear in streamed_linears(model) for t in streamed_tensors(linear)]
    assert streamed and all(_inside(t, packed._arena) for t in streamed)
    with torch.inference_mode():
        assert torch.equal(logits(packed), logits(plain))
