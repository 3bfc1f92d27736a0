"""The fused CPU kernels (engine/cpu_kernels.py): each kernel against the PyTorch ops it replaces,
the runner's fused steps against its PyTorch steps (decode, several new tokens per row, padding,
speculative rollback), and the fallback where the kernels cannot be built."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm_server.engine import cpu_kernels
from llm_server.engine.llama_runner import LlamaRunner
from tests.test_engine_batching import build_model


@pytest.fixture(scope="module")
def kernels() -> cpu_kernels.CpuKernels:
    built = cpu_kernels.load()
    assert built is not None, "the kernels must build on the test machine (g++ is part of it)"
    return built


@pytest.fixture
def rebuild(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A fresh build cache, and :func:`cpu_kernels.load` forgetting what it loaded before."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernels.load.cache_clear()
    yield
    cpu_kernels.load.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_and_silu_mul_match_torch(kernels: cpu_kernels.CpuKernels, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 40, generator=generator).to(dtype)
    delta = torch.randn(3, 2, 40, generator=generator).to(dtype)
    weight = torch.randn(40, generator=generator).to(dtype)
    expected_x = x + delta
    expected = F.rms_norm(expected_x.float(), (40,), weight.float(), 1e-5)
    out = torch.empty_like(x)
    kernels.add_rms_norm(x, delta, weight, out, 1e-5)
    assert torch.equal(x, expected_x)  # the residual is added in place, rounded to x's dtype
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(out.float(), expected, **tolerance)
    gate_up = torch.randn(5, 2 * 24, generator=generator).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up).float(), F.silu(gate) * up, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [6, 8, 64, 128])  # 64, 128: the unrolled sum of values; 6: a partial key block
def test_attention_sees_each_querys_own_past_only(kernels: cpu_kernels.CpuKernels, head_dim: int,
                                                  dtype: torch.dtype) -> None:
    """Two rows (slots 1 and 2 of 3), two new tokens each, grouped heads: against a softmax over
    the keys at positions <= the query's."""
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads, capacity = 4, 2, 40
    keys = torch.randn(3, kv_heads, head_dim, capacity, generator=generator).to(dtype)
    values = torch.randn(3, kv_heads, capacity, head_dim, generator=generator).to(dtype)
    q = torch.randn(2, 2, heads, head_dim, generator=generator).to(dtype)
    positions = torch.tensor([[33, 34], [0, 1]])
    out = kernels.attend(q, keys, values, positions, kv_heads, lo=1).view(2, 2, heads, head_dim).float()
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for i in range(2):
        for t in range(2):
            seen = int(positions[i, t]) + 1
            for h in range(heads):
                k = keys[1 + i, h // 2, :, :seen].float()
                probs = torch.softmax(q[i, t, h].float() @ k / head_dim**0.5, dim=-1)
                expected = probs @ values[1 + i, h // 2, :seen].float()
                torch.testing.assert_close(out[i, t, h], expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_steps_match_the_pytorch_steps(dtype: torch.dtype) -> None:
    """The same model through a fused runner and a PyTorch one: prefill (PyTorch in both), decode of
    two rows, three new tokens in one row beside one in the other (padding), every position's
    logits, and a rollback."""
    model = build_model(256, "llama").to(dtype)
    fused = LlamaRunner(model, max_slots=3, max_context=128, fused_kernels=True)
    plain = LlamaRunner(model, max_slots=3, max_context=128, fused_kernels=False)
    assert fused._kernels is not None and plain._kernels is None
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    with torch.inference_mode():
        handles = {runner: [runner.open(), runner.open()] for runner in (fused, plain)}

        def both(tokens: list[list[int]], every: bool = False) -> torch.Tensor:
            logits = [runner.forward(handles[runner], tokens, every=every) for runner in (fused, plain)]
            torch.testing.assert_close(logits[0], logits[1], **tolerance)
            return logits[0]

        logits = both([[5, 6, 7, 8, 9], [10, 11]])
        for _ in range(6):
            logits = both([[int(t)] for t in logits.argmax(-1)])
        assert both([[3, 4, 5], [6]], every=True).shape == (4, 256)
        for runner in (fused, plain):
            runner.rollback(handles[runner][0], handles[runner][0].length - 2)
        both([[7], [8]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int4", "auto"])
def test_the_int4_body_in_one_call_matches_the_layer_by_layer_calls(kernels: cpu_kernels.CpuKernels,
                                                                    dtype: torch.dtype, mode: str) -> None:
    """Every layer of a small step in one kernel call (VNNI int4 linears) gives exactly the logits of
    the per-layer calls: decode rows, several new tokens per row, every position's logits."""
    if not kernels.has_vnni:
        pytest.skip("this CPU has no AVX-512 VNNI: the int4 linears (and their one-call body) are not built")
    model = build_model(256, "llama").to(dtype)
    with torch.no_grad():  # norms that differ from each other (they start as ones)
        layers = model.model.layers
        for norm in [model.model.norm, *(n for layer in layers for n in (layer.input_layernorm,
                                                                         layer.post_attention_layernorm))]:
            norm.weight.normal_(1.0, 0.3)
    body = LlamaRunner(model, max_slots=3, max_context=128, quantization=mode)
    layered = LlamaRunner(model, max_slots=3, max_context=128, quantization=mode)
    assert body._body is not None and body._body.layers == 2
    assert body._body.max_rows == (8 if mode == "auto" else 192)
    layered._body = None
    with torch.inference_mode():
        handles = {runner: [runner.open(), runner.open()] for runner in (body, layered)}

        def both(tokens: list[list[int]], every: bool = False) -> torch.Tensor:
            logits = [runner.forward(handles[runner], tokens, every=every) for runner in (body, layered)]
            assert torch.equal(logits[0], logits[1])
            return logits[0]

        calls: list[int] = []
        original = kernels.int4_body
        kernels.int4_body = lambda *args: calls.append(args[5].numel()) or original(*args)  # type: ignore[method-assign]
        try:
            logits = both([[5, 6, 7, 8, 9], [10, 11]])
            for _ in range(5):
                logits = both([[int(t)] for t in logits.argmax(-1)])
            both([[3, 4, 5], [6]], every=True)
            both([[3, 4, 5, 6, 7, 8], [6, 7, 8, 9]], every=True)  # 12 rows: over auto's int4 limit of 8
        finally:
            del kernels.int4_body
    assert calls == [2] * 5 + [6] + ([] if mode == "auto" else [12])  # the prefill from scratch runs in PyTorch


def test_the_runner_uses_the_kernels_for_small_steps_only(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(256, "llama")
    runner = LlamaRunner(model, max_slots=cpu_kernels.FUSED_MAX_ROWS + 1, max_context=256)
    calls: list[int] = []
    original = runner._run_fused
    monkeypatch.setattr(runner, "_run_fused", lambda *args: calls.append(len(args[2])) or original(*args))
    with torch.inference_mode():
        handles = [runner.open() for _ in range(cpu_kernels.FUSED_MAX_ROWS + 1)]
        runner.forward(handles[:1], [[1, 2, 3]])  # a prefill from scratch: PyTorch's SDPA
        runner.forward(handles[:1], [[4]])
        runner.forward(handles[1:], [[1, 2]] * cpu_kernels.FUSED_MAX_ROWS)  # fresh again
        runner.forward(handles, [[5]] * len(handles))  # one row more than the kernels take
        long_chunk = list(range(1, cpu_kernels.FUSED_MAX_STEPS + 2))
        runner.forward(handles[:1], [long_chunk])  # a prompt chunk longer than the kernels take
        runner.forward(handles[:1], [long_chunk[:-1]])
    assert calls == [1, 1]


def test_without_a_compiler_the_runner_keeps_its_pytorch_ops(
    monkeypatch: pytest.MonkeyPatch, rebuild: None, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert cpu_kernels.load() is None
    assert "fused CPU kernels unavailable" in caplog.text
    runner = LlamaRunner(build_model(256, "llama"), max_slots=1, max_context=64)
    assert runner._kernels is None
    with torch.inference_mode():
        handle = runner.open()
        runner.forward([handle], [[1, 2, 3]])
        assert runner.forward([handle], [[4]]).shape == (1, 256)


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch, rebuild: None) -> None:
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    assert cpu_kernels.load() is None


def test_built_once_then_loaded_from_the_cache(monkeypatch: pytest.MonkeyPatch, rebuild: None,
                                               tmp_path: Path) -> None:
    assert cpu_kernels.load() is not None
    built = list(tmp_path.glob("llm_server/kernels/cpu_kernels_*.so"))
    assert len(built) == 1
    cpu_kernels.load.cache_clear()
    monkeypatch.setenv("CXX", "/nonexistent/c++")  # a second build would fail
    assert cpu_kernels.load() is not None


def test_a_portable_prebuilt_library_serves_where_no_compiler_is(
    monkeypatch: pytest.MonkeyPatch, rebuild: None, tmp_path: Path
) -> None:
    """The container image's arrangement: no native build cached, no compiler, and a portable build
    named in ``LLM_SERVER_CPU_KERNELS_LIB`` (made ahead with ``python -m llm_server.engine.cpu_kernels``)."""
    prebuilt = tmp_path / "portable" / "cpu_kernels.so"
    cpu_kernels._build(prebuilt, cpu_kernels.portable_flags())
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv(cpu_kernels.PREBUILT_ENV, str(prebuilt))
    assert cpu_kernels.load() is not None
    assert not list(tmp_path.glob("llm_server/kernels/*.so"))  # nothing was built natively
    model = build_model(256, "llama")
    fused = LlamaRunner(model, max_slots=1, max_context=64)
    plain = LlamaRunner(model, max_slots=1, max_context=64, fused_kernels=False)
    assert fused._kernels is not None
    with torch.inference_mode():
        handles = [fused.open(), plain.open()]
        for runner, handle in zip((fused, plain), handles, strict=True):
            runner.forward([handle], [[1, 2, 3]])
        torch.testing.assert_close(fused.forward([handles[0]], [[4]]), plain.forward([handles[1]], [[4]]),
                                   atol=1e-4, rtol=1e-4)


def test_int8_linear_errs_like_the_pytorch_kernel(kernels: cpu_kernels.CpuKernels) -> None:
    """The VNNI int8 linear (activations as two int8 levels per group of 32) against the exact
    product: the error of ``_weight_int8pack_mm`` (float activations; both round the output to
    bf16), and Int8Linear uses it for 1-2 rows."""
    if not kernels.has_vnni:
        pytest.skip("this build has no AVX-512 VNNI int8 linear")
    from llm_server.engine.quant import INT8_KERNEL_MAX_ROWS, Int8Linear

    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(320, 192, generator=generator).bfloat16()
    linear = Int8Linear(weight, None)
    for rows in range(1, INT8_KERNEL_MAX_ROWS + 1):
        x = (torch.randn(rows, 192, generator=generator) * 3).bfloat16()
        exact = x.float() @ weight.float().t()
        ours = kernels.int8_linear(x, linear.qweight, linear.scales).float()
        theirs = torch.ops.aten._weight_int8pack_mm(x, linear.qweight, linear.scales).float()
        assert (ours - exact).norm() < 1.2 * (theirs - exact).norm()
        assert torch.equal(linear(x), kernels.int8_linear(x, linear.qweight, linear.scales))
    x = torch.randn(INT8_KERNEL_MAX_ROWS + 1, 192, generator=generator).bfloat16()
    assert torch.equal(linear(x), torch.ops.aten._weight_int8pack_mm(x, linear.qweight, linear.scales))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_is_the_dequantized_weights_at_every_row_count(kernels: cpu_kernels.CpuKernels,
                                                                    dtype: torch.dtype) -> None:
    """The VNNI int4 linear handles x rows 4 at a time (1, 2, 3 or 4 per pass over a weight block):
    every row count from 1 to 9 gives the product with the de-quantized weights, as exactly as the
    activations' two int8 levels allow (float32) or the bf16 output's rounding (bf16)."""
    if not kernels.has_vnni:
        pytest.skip("this build has no AVX-512 VNNI int4 linear")
    from llm_server.engine.quant import Int4Linear

    generator = torch.Generator().manual_seed(3)
    linear = Int4Linear((torch.randn(48, 128, generator=generator) * 0.05).to(dtype), None, 32)
    assert linear._kernels is not None
    dequantized = linear.dequantized().float()
    for rows in range(1, 10):
        x = (torch.randn(rows, 128, generator=generator) * 2).to(dtype)
        expected = x.float() @ dequantized.t()
        error = float((linear(x).float() - expected).norm() / expected.norm())
        assert error < (2e-4 if dtype == torch.float32 else 1e-2), (rows, error)
