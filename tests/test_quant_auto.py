"""``quantization: auto``: an int4 copy and the float (oneDNN-packed) copy of each weight, chosen per
call by its number of rows. What a user relies on: a call of few rows (one user's decode step) is
exactly the int4 mode's, a call of many rows (a large batch, a prefill) exactly the float mode's;
the option is accepted by the config and the loader, and a wrong value is a clear error."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llm_server.engine.llama_runner import LlamaRunner
from llm_server.engine.quant import (
    AUTO_MAX_SMALL_ROWS,
    HEAD_AUTO_MAX_SMALL_ROWS,
    FloatLinear,
    Int4Linear,
    Int8Linear,
    RowSwitchLinear,
    make_linear,
)
from llm_server.helper_functionality.config_models import ConfigError, ModelOptimizations, validate_section
from llm_server.helper_functionality.model_loading import ModelLoadError, resolve_quantization
from tests.test_engine_batching import build_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_linear_uses_int4_for_few_rows_and_the_float_weights_above(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(192, 256, generator=generator) * 0.05).to(dtype)
    linear = make_linear(weight, None, True, "auto")
    assert isinstance(linear, RowSwitchLinear)
    int4, plain = make_linear(weight, None, True, "int4"), make_linear(weight, None, True, None)
    assert linear.weight_bytes == int4.weight_bytes  # what a decode step of few rows reads
    assert linear.resident_bytes == int4.weight_bytes + plain.weight_bytes
    for rows in (1, AUTO_MAX_SMALL_ROWS, AUTO_MAX_SMALL_ROWS + 1, 300):
        x = torch.randn(rows, 256, generator=generator).to(dtype)
        expected = int4(x) if rows <= AUTO_MAX_SMALL_ROWS else plain(x)
        assert torch.equal(linear(x), expected), rows
        # the rows of a call count, whatever its leading shape
        assert torch.equal(linear(x.view(1, rows, 256)), expected.view(1, rows, 192)), rows


def test_the_heads_int8_copy_serves_one_or_two_rows_and_the_float_weights_above() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(320, 64, generator=generator) * 0.05).to(torch.bfloat16)
    head = make_linear(weight, None, True, "auto-int8")
    assert isinstance(head, RowSwitchLinear) and isinstance(head.small, Int8Linear)
    int8, plain = make_linear(weight, None, True, "int8"), make_linear(weight, None, True, None)
    assert HEAD_AUTO_MAX_SMALL_ROWS == 2 < AUTO_MAX_SMALL_ROWS
    for rows in (1, 2, 3, AUTO_MAX_SMALL_ROWS):
        x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
        assert torch.equal(head(x), int8(x) if rows <= HEAD_AUTO_MAX_SMALL_ROWS else plain(x)), rows


def test_auto_keeps_one_float_copy_where_int4_cannot_take_the_weight() -> None:
    weight = torch.randn(100, 64) * 0.05  # 100 output rows: not a multiple of the int4 packing
    assert isinstance(make_linear(weight, None, True, "auto"), FloatLinear)


def greedy(runner: LlamaRunner, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """``steps`` greedy ids per prompt, all decoded in one batch, and each step's logits."""
    handles = [runner.open() for _ in prompts]
    ids: list[list[int]] = [[] for _ in prompts]
    seen = []
    with torch.inference_mode():
        logits = runner.forward(handles, prompts)
        for _ in range(steps):
            seen.append(logits)
            for row, token in enumerate(logits.argmax(-1).tolist()):
                ids[row].append(int(token))
            logits = runner.forward(handles, [[row[-1]] for row in ids])
    return ids, seen


def test_one_user_gets_the_int4_mode_and_a_large_batch_the_float_mode() -> None:
    auto = LlamaRunner(build_model(512), max_slots=16, max_context=256, quantization="auto")
    assert isinstance(auto._layers[0].gate_up, RowSwitchLinear)
    assert isinstance(auto._layers[0].gate_up.small, Int4Linear)
    assert isinstance(auto._lm_head, RowSwitchLinear) and isinstance(auto._lm_head.small, Int8Linear)
    int4 = LlamaRunner(build_model(512), max_slots=16, max_context=256, quantization="int4")
    plain = LlamaRunner(build_model(512), max_slots=16, max_context=256, quantization=None)
    short = [[5, 9, 3, 7]]  # a prefill of at most AUTO_MAX_SMALL_ROWS rows, then one-row decode steps
    assert len(short[0]) <= AUTO_MAX_SMALL_ROWS
    ids, logits = greedy(auto, short, 12)
    int4_ids, int4_logits = greedy(int4, short, 12)
    assert ids == int4_ids
    assert all(torch.equal(a, b) for a, b in zip(logits, int4_logits, strict=True))
    batch = [[3 + i, 40 + 2 * i, 7, 100 + i] for i in range(AUTO_MAX_SMALL_ROWS + 4)]
    ids, logits = greedy(auto, batch, 8)
    plain_ids, plain_logits = greedy(plain, batch, 8)
    assert ids == plain_ids
    assert all(torch.equal(a, b) for a, b in zip(logits, plain_logits, strict=True))
    # the check can tell the modes apart: int4 weights give other logits
    assert not torch.equal(greedy(int4, batch, 1)[1][0], plain_logits[0])


def test_auto_is_a_valid_setting_and_a_wrong_value_is_a_clear_error() -> None:
    assert ModelOptimizations(quantization="auto").quantization == "auto"
    with pytest.raises(ConfigError) as caught:
        validate_section(ModelOptimizations, {"quantization": "int3"}, "model_config.yaml", "model.optimizations")
    message = str(caught.value)
    assert "quantization" in message and "auto" in message
    assert resolve_quantization("auto", CPU, torch.bfloat16) == "auto"
    assert resolve_quantization(" AUTO ", CPU, torch.bfloat16) == "auto"
    assert resolve_quantization("auto", torch.device("cuda"), torch.bfloat16) is None  # a CPU option
    with pytest.raises(ModelLoadError, match="auto"):
        resolve_quantization("autox", CPU, torch.bfloat16)


def test_the_runner_refuses_an_unknown_mode() -> None:
    model: Any = build_model(512)
    with pytest.raises(ValueError, match="auto"):
        LlamaRunner(model, max_slots=1, max_context=16, quantization="int3")
