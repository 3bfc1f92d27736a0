"""Weight-only int8 / int4 in the engine's Llama runner: the quantized linears against a float
reference, the whole runner against the HF forward on the de-quantized weights, the
``quantization`` option from ``initialize`` to the runner, and one resident copy of the weights
when the engine owns the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llm_server.engine import cpu_kernels
from llm_server.engine.llama_runner import LlamaRunner
from llm_server.engine.llama_weights import mark_engine_owned
from llm_server.engine.quant import (
    INT4_DEQUANT_ABOVE_ROWS,
    INT8_DEQUANT_ABOVE_ROWS,
    INT8_KERNEL_MAX_ROWS,
    FloatLinear,
    Int4Linear,
    Int8Linear,
    make_linear,
)
from llm_server.helper_functionality.model_loading import ModelLoadError, initialize, resolve_quantization
from tests.conftest import build_tiny_llama
from tests.test_engine_batching import build_model
from tests.test_engine_runner import hf_last_logits

CPU = torch.device("cpu")
# Relative error of y = x @ W^T against float weights, for Gaussian weights: int8 per channel ~0.8%,
# int4 in groups of 32 ~8% (asymmetric round-to-nearest).
BOUND = {"int8": 0.015, "int4": 0.10}
ROWS = {"int8": (1, 5, INT8_DEQUANT_ABOVE_ROWS + 1), "int4": (1, 5, INT4_DEQUANT_ABOVE_ROWS + 1)}


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_is_close_to_the_float_one_on_every_path(mode: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(192, 256, generator=generator) * 0.05).to(dtype)
    bias = torch.randn(192, generator=generator).to(dtype)
    linear = make_linear(weight, bias, True, mode)
    assert isinstance(linear, Int8Linear if mode == "int8" else Int4Linear)
    assert linear.weight_bytes < weight.numel() * weight.element_size() / (1.8 if mode == "int8" else 3.0)
    dequantized = linear.dequantized().float()
    for rows in ROWS[mode]:  # the weight-only kernel for decode-sized calls, de-quantized matmul above
        x = torch.randn(2, rows, 256, generator=generator).to(dtype)
        y = linear(x)
        assert y.shape == (2, rows, 192) and y.dtype == dtype
        exact = x.float() @ weight.float().t() + bias.float()
        assert relative_error(y, exact) < BOUND[mode]
        # the kernel computes exactly with the weights it stands for, up to the activations' rounding:
        # to the dtype, or to two int8 levels per group of 32 in the fused VNNI kernels
        kernel_rows = INT8_KERNEL_MAX_ROWS if mode == "int8" else INT4_DEQUANT_ABOVE_ROWS
        vnni = linear._kernels is not None and 2 * rows <= kernel_rows
        tolerance = (2e-4 if vnni else 1e-5) if dtype == torch.float32 else 1e-2
        assert relative_error(y, x.float() @ dequantized.t() + bias.float()) < tolerance


def test_shapes_the_int4_kernel_cannot_take_stay_float() -> None:
    weight = torch.randn(100, 64) * 0.05  # 100 output rows: not a multiple of the 64-row packing
    linear = make_linear(weight, None, True, "int4")
    assert isinstance(linear, FloatLinear)
    x = torch.randn(3, 64)
    torch.testing.assert_close(linear(x), x @ weight.t(), atol=1e-5, rtol=1e-5)


def dequantize_into(model: Any, runner: LlamaRunner) -> None:
    """Write the weights the runner's quantized linears stand for back into the HF model."""
    with torch.no_grad():
        for layer, weights in zip(model.model.layers, runner._layers, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            for modules, linear in (
                ([attn.q_proj, attn.k_proj, attn.v_proj], weights.qkv),
                ([attn.o_proj], weights.o),
                ([mlp.gate_proj, mlp.up_proj], weights.gate_up),
                ([mlp.down_proj], weights.down),
            ):
                parts = linear.dequantized().split([m.weight.shape[0] for m in modules])
                for module, part in zip(modules, parts, strict=True):
                    module.weight.data = part.to(module.weight.dtype).contiguous()
        model.lm_head.weight.data = runner._lm_head.dequantized().to(model.lm_head.weight.dtype).contiguous()


@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_quantized_runner_is_the_hf_forward_on_its_dequantized_weights(
    mode: str, kind: str, vnni: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batched prefill (a long prompt: the de-quantized path) and decode steps (the int kernels).
    PyTorch's weight-only kernels compute exactly with the de-quantized weights; the fused VNNI
    kernels carry the activations as two int8 levels per group of 32 (~15 bits), so they match them
    to about 1e-4."""
    if vnni and not has_vnni():
        pytest.skip("no fused CPU kernels with AVX-512 VNNI on this machine")
    monkeypatch.setattr("llm_server.engine.quant.VNNI_LINEARS", vnni)
    reference = build_model(512, kind)
    if kind == "llama":  # a tied head would quantize the input embedding too: untie it in the reference
        reference.lm_head.weight = torch.nn.Parameter(reference.lm_head.weight.detach().clone())
    runner = LlamaRunner(build_model(512, kind), max_slots=4, max_context=1024, quantization=mode)
    assert (runner._layers[0].gate_up._kernels is not None) == vnni
    dequantize_into(reference, runner)
    handles = [runner.open() for _ in range(2)]
    prompts = [list(range(3, 40)), list(range(100, 400))]  # 300 rows: the de-quantized prefill path

    def check(logits: torch.Tensor, prompts: list[list[int]]) -> None:
        for row, prompt in enumerate(prompts):
            expected = hf_last_logits(reference, prompt)
            if vnni:  # measured 1.0-1.4e-4 (float32 model); one int8 level alone for x gave 2-5%
                assert relative_error(logits[row], expected) < 1e-3
            else:
                torch.testing.assert_close(logits[row], expected, atol=2e-4, rtol=1e-4)

    with torch.inference_mode():
        check(runner.forward(handles, prompts), prompts)
        for token in (7, 8, 9):
            logits = runner.forward(handles, [[token], [token + 1]])
            prompts = [prompts[0] + [token], prompts[1] + [token + 1]]
            check(logits, prompts)


def has_vnni() -> bool:
    kernels = cpu_kernels.load()
    return kernels is not None and kernels.has_vnni


def test_quantization_choice_reaches_the_runner(tmp_path: Path, tokenizer: Any) -> None:
    assert resolve_quantization("int8", CPU, torch.bfloat16) == "int8"
    assert resolve_quantization(" INT4 ", CPU, torch.bfloat16) == "int4"
    # a CPU option: ignored on a GPU, so one config with int4 serves on both
    assert resolve_quantization("int4", torch.device("cuda"), torch.bfloat16) is None
    with pytest.raises(ModelLoadError, match="on CPU use quantization: int8 or int4"):
        resolve_quantization("4bit", CPU, torch.bfloat16)
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        resolve_quantization("int3", CPU, torch.bfloat16)
    folder = tmp_path / "tiny"
    build_tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _, model = initialize(device="cpu", model_id=str(folder), dtype="float32", quantization="int4", compile=False)
    runner = LlamaRunner(model, max_slots=1, max_context=64)
    assert runner.quantization == "int4" and isinstance(runner._layers[0].gate_up, Int4Linear)
    assert isinstance(runner._lm_head, Int8Linear)  # int4 heads cost too much quality (see quant.HEAD_QUANTIZATION)
    _, plain = initialize(device="cpu", model_id=str(folder), dtype="float32", quantization="none", compile=False)
    assert LlamaRunner(plain, max_slots=1, max_context=64).quantization is None


@pytest.mark.parametrize("mode", [None, "int8"])
def test_an_engine_owned_model_keeps_one_copy_of_the_weights(mode: str | None) -> None:
    kept = build_model(512, "llama")
    owned = build_model(512, "llama")  # same seed: same weights
    mark_engine_owned(owned)
    shared = LlamaRunner(kept, max_slots=2, max_context=64, quantization=mode)
    single = LlamaRunner(owned, max_slots=2, max_context=64, quantization=mode)
    layer = owned.model.layers[0]
    dropped = [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj]
    assert all(m.weight.device.type == "meta" for m in dropped)
    assert owned.model.embed_tokens.weight.device.type == "cpu"  # the embedding (tied LM head) stays
    assert kept.model.layers[0].mlp.gate_proj.weight.device.type == "cpu"  # not owned: the HF model still runs
    with torch.inference_mode():
        outputs = [runner.forward([runner.open()], [[5, 6, 7]]) for runner in (shared, single)]
    torch.testing.assert_close(outputs[1], outputs[0], atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="handed to the serving engine"):
        owned(torch.tensor([[5, 6, 7]]))  # fails loudly rather than computing garbage


def greedy_with_logprobs(runner: LlamaRunner, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """``steps`` greedy ids from ``runner`` and each one's log-probability (what the engine reports)."""
    ids, logprobs, handle = list(prompt), [], runner.open()
    with torch.inference_mode():
        logits = runner.forward([handle], [ids])
        for _ in range(steps):
            ids.append(int(logits[0].argmax()))
            logprobs.append(float(torch.log_softmax(logits[0].float(), dim=-1)[ids[-1]]))
            logits = runner.forward([handle], [[ids[-1]]])
    return ids[len(prompt):], logprobs


def test_the_server_loader_serves_the_configured_int4_weights(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model_config.yaml's ``quantization: int4`` -> initialize -> the engine's runner: the served
    tokens' log-probabilities are an int4 runner's, not a float or int8 one's (the tiny random model
    repeats one id whatever the weights, so the text alone could not tell them apart)."""
    import yaml

    from llm_server.engine.batch_engine import EngineConfig
    from llm_server.engine.loader import load_engine
    from llm_server.engine.types import GenerationRequest, LogprobLog, SamplingParams
    from llm_server.helper_functionality.yaml_loading import PACKAGE_CONFIG_DIR, read_model_section

    folder = tmp_path / "tiny"
    build_tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    document = yaml.safe_load((PACKAGE_CONFIG_DIR / "model_config.yaml").read_text(encoding="utf-8"))
    document["model"].update(id=str(folder), device="cpu")
    document["model"]["optimizations"].update(dtype="float32", quantization="int4")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "model_config.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path / "config"))

    prompt = tokenizer("The quick brown fox")["input_ids"]
    log = LogprobLog()
    params = SamplingParams(max_new_tokens=8, do_sample=False, logprobs=0, logprob_sink=log)
    engine = load_engine(read_model_section(), EngineConfig(max_running=2), "tiny")
    engine.start()
    try:
        text = engine.submit(GenerationRequest("q", prompt, params)).result().text
    finally:
        engine.shutdown(timeout_s=30)
    served = log.drain()

    references: dict[str | None, tuple[list[int], list[float]]] = {}
    for mode in (None, "int8", "int4"):
        runner = LlamaRunner(build_tiny_llama(len(tokenizer)), max_slots=1, max_context=64, quantization=mode)
        references[mode] = greedy_with_logprobs(runner, prompt, 8)
    ids, logprobs = references["int4"]
    assert [item.token_id for item in served] == ids
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    tolerance = 1e-4
    assert max(abs(item.logprob - lp) for item, lp in zip(served, logprobs, strict=True)) < tolerance
    for mode in (None, "int8"):  # the check can tell the modes apart
        assert max(abs(a - b) for a, b in zip(references[mode][1], logprobs, strict=True)) > 10 * tolerance
