"""Linear layers of the compact Llama runner: oneDNN pre-packed float weights, or weight-only int8 / int4.

:func:`make_linear` turns one (fused) weight into the callable the runner's forward uses:

- ``None`` (no quantization): ``y = x @ W^T + b`` with ``W`` pre-packed for oneDNN on CPU when
  possible (``mkldnn._linear_pointwise``), else ``F.linear``;
- ``"int8"``: symmetric int8 weights with one scale per output channel
  (``aten._weight_int8pack_mm``; calls of 1-2 rows through the fused CPU kernels' VNNI int8 linear
  where it exists);
- ``"int4"``: asymmetric 4-bit weights with a scale and zero per group of 32 input channels
  (the fused CPU kernels' VNNI int4 linear where it exists, else ``aten._weight_int4pack_mm_for_cpu``);
- ``"auto"``: both an int4 copy and the oneDNN-packed float copy stay resident, and each call picks
  one by its number of rows (:class:`RowSwitchLinear`): int4 for decode steps of few sequences
  (bound by the bytes of weight read), the float kernel for larger batches and prefill.

The weight-only kernels read 2x / 4x fewer weight bytes than bfloat16, which is what a decode step
of one sequence is bound by; with many rows per call they are slower than oneDNN's bf16 kernel
(see docs/engine.md for the measurements). The VNNI linears (:mod:`.cpu_kernels`, AVX-512 VNNI
machines) carry the activations as two int8 levels per group of 32 inputs (about 15 bits: as
accurate as PyTorch's kernels) and multiply them with integer dot products, 1.5-3x faster than
PyTorch's weight-only kernels at 1-8 rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

import torch
import torch.nn.functional as F

from llm_server.engine import cpu_kernels
from llm_server.helper_functionality.config_models import QUANTIZATION_ATTR as QUANTIZATION_ATTR  # the runner reads it
from llm_server.helper_functionality.config_models import RUNNER_QUANTIZATIONS

logger = logging.getLogger(__name__)

QUANT_MODES = RUNNER_QUANTIZATIONS  # ``quantization: int8 | int4 | auto`` (model_config.yaml)
#: Attribute the server's engine loader sets: only the engine runs this model (its weights may be re-laid).
ENGINE_OWNED_ATTR = "llm_server_engine_owned"
#: The LM head's quantization for each mode. The head is int8 even in int4 mode: in int4 (groups of
#: 32) its logits err by ~9% on the embedded model (its tied embedding is Q8_0 in the GGUF), against
#: ~0.3% for the layers (Q4_1 in the GGUF: int4 groups of 32 represent them almost exactly).
HEAD_QUANTIZATION: dict[str, str | None] = {"int8": "int8", "int4": "int8", "auto": "auto-int8"}
#: ``auto`` modes: the weight-only copy used for calls of few rows (``auto-int8``: the LM head's).
AUTO_SMALL_MODES = {"auto": "int4", "auto-int8": "int8"}
#: ``auto``: calls of at most this many rows use the weight-only copy, larger ones the float copy.
#: Measured on the embedded model (``WEIGHT_BENCH_MODES=bf16,int4 benchmarks/weight_bench.py step``,
#: AVX-512 EPYC, 1 thread, shared machine; docs/engine.md): the whole decode step is faster in int4
#: at 1-8 sequences and slower at 12 and more.
AUTO_MAX_SMALL_ROWS = 8
#: The LM head's ``auto-int8`` copy serves calls of at most this many rows. int8's matrix-vector kernel
#: costs about one weight read per row, so past 2 rows oneDNN's bf16 kernel wins even on a head whose
#: int8 copy is half the bytes (one step of the embedded model at 6-8 sequences: 31-32 -> 25-27 ms;
#: a 128256 x 2048 head: int8 faster at 1-2 rows, slower from 3; docs/engine.md).
HEAD_AUTO_MAX_SMALL_ROWS = 2
_AUTO_MAX_SMALL_ROWS = {"auto": AUTO_MAX_SMALL_ROWS, "auto-int8": HEAD_AUTO_MAX_SMALL_ROWS}
INT4_GROUP_SIZES = (32, 64, 128)  # the first that divides the input width is used
#: Calls with more rows than this (prefill) de-quantize the weight and use the float matmul: the
#: weight-only kernels' cost grows with the rows much faster than oneDNN's (3x slower prefill).
#: Measured crossovers on an AVX-512 EPYC, one thread: int8 ~64 rows, int4 ~200 rows.
INT8_DEQUANT_ABOVE_ROWS = 64
#: Calls of at most this many rows go through the fused CPU kernels' int8 linear where the build has
#: AVX-512 VNNI (:mod:`.cpu_kernels`): the embedded model's LM head at 1-2 rows 0.7-1.0 ms against
#: 2.0-2.6 ms for ``_weight_int8pack_mm`` (docs/engine.md). Only the head's auto-int8 copy (at most
#: 2 rows) and the int8 mode's decode steps of 1-2 sequences get there.
INT8_KERNEL_MAX_ROWS = 2
#: Quantized linears built while this is False keep PyTorch's weight-only kernels even where the VNNI
#: ones exist (the tests that check the exact arithmetic of the de-quantized weights set it).
VNNI_LINEARS = True
INT4_DEQUANT_ABOVE_ROWS = 192
_INT4_BLOCK_N = 64  # _convert_weight_to_int4pack_for_cpu packs 64 output rows at a time


class Linear(Protocol):
    """What the runner calls: ``y = x @ W^T + b`` over the last dimension of ``x``."""

    out_features: int
    weight_bytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


#: Weights smaller than this (elements) stay plain: oneDNN's packed call costs ~11 us more per call
#: than ``F.linear`` (64x128: 16 vs 5 us; 256x512 at 16 rows about even; 576x1536: 274 vs 379 us),
#: which made the 2-layer test families' 16-row decode step 6-8 % slower (2026-12-07).
PACK_MIN_ELEMENTS = 1 << 17


def _can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can take ``weight`` pre-packed (CPU, float32/bfloat16) and it is big enough to gain."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available() or weight.numel() < PACK_MIN_ELEMENTS:
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32


class FloatLinear:
    """``y = x @ W^T + b`` with ``W`` pre-packed for oneDNN when possible (then only the packed
    copy is kept)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> None:
        self.weight: torch.Tensor | None = weight
        self.bias = bias
        self.out_features = int(weight.shape[0])
        self.packed: torch.Tensor | None = None
        if pack and _can_pack(weight):
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
                probe = weight.new_zeros(1, weight.shape[1])
                torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
                self.packed = packed
                self.weight = None  # the packed copy is the one the forward reads
            except (RuntimeError, AttributeError):  # an older or differently built torch
                self.packed = None
        used = self.packed if self.packed is not None else weight
        self.weight_bytes = used.numel() * used.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)


def _vnni_kernels(weight: torch.Tensor) -> cpu_kernels.CpuKernels | None:
    """The fused CPU kernels when their VNNI linears can serve ``weight`` [out, in] (CPU, in a
    multiple of 64, a dtype the kernels take), else None."""
    if not VNNI_LINEARS or weight.device.type != "cpu" or weight.shape[1] % 64:
        return None
    kernels = cpu_kernels.load()
    return kernels if kernels is not None and kernels.has_vnni and kernels.supports(weight.dtype) else None


def _vnni_int4_layout(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` [out, in] (levels 0-15, groups of 32) and its per-group ``scale`` and ``zero`` [out, in /
    32] in the layout of ``CpuKernels.int4_linear``: (nibbles [out, in / 2] uint8, scale_zero)."""
    out, width = q.shape
    blocks, groups = out // 16, width // 32
    # (block, row r, group, vector i, nibble h, byte j) -> (block, group, i, h, r, j)
    levels = q.to(torch.uint8).view(blocks, 16, groups, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
    nibbles = torch.empty((out, width // 2), dtype=torch.uint8)  # a tensor of its own (no view's base)
    nibbles.view(blocks, groups, 4, 16, 4).copy_(levels[:, :, :, 0] | (levels[:, :, :, 1] << 4))
    per_row = torch.stack([scale, zero]).view(2, blocks, 16, groups).permute(1, 3, 0, 2)  # (block, group, 2, 16)
    return nibbles, per_row.contiguous().to(dtype)


def _vnni_int4_levels(nibbles: torch.Tensor) -> torch.Tensor:
    """The levels [out, in] (uint8) that :func:`_vnni_int4_layout` packed into ``nibbles``."""
    out, half = nibbles.shape
    blocks, groups = out // 16, half * 2 // 32
    packed = nibbles.view(blocks, groups, 4, 16, 4)
    levels = torch.stack([packed & 15, packed >> 4], dim=3)  # (block, group, i, h, r, j)
    return levels.permute(0, 4, 1, 2, 3, 5).reshape(out, half * 2)


class Int8Linear:
    """Weight-only int8: ``W ~= q * scale[:, None]``, ``q`` in [-127, 127], one scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.qweight = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scales = scale.to(weight.dtype)
        self.bias = bias
        self.out_features = int(weight.shape[0])
        self.weight_bytes = self.qweight.numel() + self.scales.numel() * self.scales.element_size()
        self._kernels = _vnni_kernels(weight)

    def dequantized(self) -> torch.Tensor:
        """The float weight the int8 one stands for, ``[out, in]`` in the activations' dtype."""
        weight = torch.empty(self.qweight.shape, dtype=self.scales.dtype)
        return torch.mul(self.qweight, self.scales[:, None], out=weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        if flat.shape[0] > INT8_DEQUANT_ABOVE_ROWS:
            return F.linear(x, self.dequantized(), self.bias)
        if self._kernels is not None and flat.shape[0] <= INT8_KERNEL_MAX_ROWS and flat.dtype == self.scales.dtype:
            y = self._kernels.int8_linear(flat, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear:
    """Weight-only int4, asymmetric per group of ``group_size`` input channels.

    ``W ~= (q - 8) * scale + zero`` with ``q`` in [0, 15] (the layout ``_weight_int4pack_mm_for_cpu``
    expects: ``zero`` is the value of the group's middle level). Where the fused CPU kernels have
    AVX-512 VNNI and the groups are of 32, one copy in their layout instead (:func:`_vnni_int4_layout`):
    their int4 linear, activations in int8 per group, is 2-3x faster than PyTorch's int4 kernel and
    faster than oneDNN's bf16 matmul up to 128 rows (docs/engine.md).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> None:
        out_features, in_features = weight.shape
        w = weight.detach().float().view(out_features, in_features // group_size, group_size)
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scale = (high - low).clamp(min=1e-12) / 15.0
        q = torch.round((w - low[..., None]) / scale[..., None]).clamp_(0, 15)
        q = q.to(torch.int32).view(out_features, in_features)
        self.out_features = int(out_features)
        self.group_size = group_size
        self.bias = bias
        self._kernels = _vnni_kernels(weight) if group_size == 32 and out_features % 16 == 0 else None
        if self._kernels is not None:
            self.nibbles, self.scale_zero = _vnni_int4_layout(q, scale, low + 8.0 * scale, weight.dtype)
            self.weight_bytes = self.nibbles.numel() + self.scale_zero.numel() * self.scale_zero.element_size()
            return
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        expected = q.to(torch.uint8).view(-1, _INT4_BLOCK_N, in_features).transpose(1, 2)
        if not torch.equal(self._blocked_levels(), expected):
            raise RuntimeError("unexpected int4 packing layout in this torch build")
        zero = low + 8.0 * scale
        # [in_features / group_size, out_features, 2] (scale, zero)
        self.scale_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(weight.dtype)
        self.weight_bytes = self.packed.numel() * self.packed.element_size() + (
            self.scale_zeros.numel() * self.scale_zeros.element_size()
        )

    def _blocked_levels(self) -> torch.Tensor:
        """The 4-bit levels as ``[out / 64, in, 64]`` uint8, unpacked from the kernel's layout: per
        block of 64 output rows, byte ``[k, j]`` holds row ``j`` (low nibble) and row ``32 + j`` (high)
        of column ``k``."""
        blocks = self.packed.view(self.out_features // _INT4_BLOCK_N, -1, _INT4_BLOCK_N // 2)
        return torch.cat([blocks & 15, blocks >> 4], dim=-1)

    def dequantized(self) -> torch.Tensor:
        """The float weight the int4 one stands for, ``[out, in]`` (possibly a transposed view) in the
        activations' dtype. Computed in the packed block order: 3x faster than unpacking first."""
        if self._kernels is not None:
            return self._vnni_dequantized()
        blocks, n = self.out_features // _INT4_BLOCK_N, self.out_features
        scale, zero = self.scale_zeros.float().unbind(-1)  # [groups, out]
        groups = scale.shape[0]

        def per_block(t: torch.Tensor) -> torch.Tensor:  # [groups, out] -> [blocks, groups, 1, 64]
            return t.view(groups, blocks, _INT4_BLOCK_N).permute(1, 0, 2).unsqueeze(2)

        levels = self._blocked_levels().view(blocks, groups, self.group_size, _INT4_BLOCK_N).float()
        weight = torch.addcmul(per_block(zero - 8.0 * scale), levels, per_block(scale))
        transposed = torch.empty(groups, self.group_size, blocks, _INT4_BLOCK_N, dtype=self.scale_zeros.dtype)
        transposed.copy_(weight.permute(1, 2, 0, 3))
        return transposed.view(-1, n).t()

    def _vnni_dequantized(self) -> torch.Tensor:
        groups = self.scale_zero.shape[1]
        scale, zero = self.scale_zero.float().permute(2, 0, 3, 1).reshape(2, self.out_features, groups, 1)
        levels = _vnni_int4_levels(self.nibbles).view(self.out_features, groups, 32).float()
        return torch.addcmul(zero, levels - 8.0, scale).view(self.out_features, -1).to(self.scale_zero.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        if flat.shape[0] > INT4_DEQUANT_ABOVE_ROWS:
            return F.linear(x, self.dequantized(), self.bias)
        if self._kernels is not None:
            y = self._kernels.int4_linear(flat.to(self.scale_zero.dtype), self.nibbles, self.scale_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scale_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class RowSwitchLinear:
    """Two copies of one weight: ``small`` (weight-only quantized) for calls of at most
    ``max_small_rows`` rows, ``large`` (float, oneDNN-packed) above. Which copy a row goes through
    depends on how many rows share the call, so results can differ slightly with the batch size."""

    def __init__(self, small: Linear, large: Linear, max_small_rows: int) -> None:
        self.small, self.large = small, large
        self.max_small_rows = max_small_rows
        self.out_features = small.out_features
        self.weight_bytes = small.weight_bytes  # what a decode step of few sequences reads
        self.resident_bytes = small.weight_bytes + large.weight_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        return self.small(x) if rows <= self.max_small_rows else self.large(x)


def fast_rows(linears: Iterable[Linear]) -> int | None:
    """The most rows of a call that every row-switching linear among ``linears`` still serves from its
    quantized copy (``quantization: auto``: :data:`AUTO_MAX_SMALL_ROWS`); None when none switches."""
    limits = [linear.max_small_rows for linear in linears if isinstance(linear, RowSwitchLinear)]
    return min(limits) if limits else None


def streamed_tensors(linear: Linear) -> list[torch.Tensor]:
    """The quantized tensors a call of few rows reads (what :mod:`.weight_arena` packs): the
    weight-only copy of an ``auto`` linear; none for a float linear (oneDNN's packed weights stay)."""
    if isinstance(linear, RowSwitchLinear):
        return streamed_tensors(linear.small)
    if isinstance(linear, Int4Linear) and linear._kernels is not None:
        return [linear.nibbles, linear.scale_zero]
    if isinstance(linear, Int4Linear):
        return [linear.packed, linear.scale_zeros]
    if isinstance(linear, Int8Linear):
        return [linear.qweight, linear.scales]
    return []


def vnni_int4(linear: Linear) -> tuple[Int4Linear, int] | None:
    """The VNNI int4 linear (no bias) that serves ``linear``'s calls of up to the returned number of
    rows, or None (another kernel, a bias, or no VNNI)."""
    inner, limit = (linear.small, linear.max_small_rows) if isinstance(linear, RowSwitchLinear) else (
        linear, INT4_DEQUANT_ABOVE_ROWS)
    if isinstance(inner, Int4Linear) and inner._kernels is not None and inner.bias is None:
        return inner, limit
    return None


def quantization_unsupported(weight: torch.Tensor, mode: str) -> str | None:
    """None when ``weight`` can be quantized with ``mode``; otherwise why not."""
    if mode in AUTO_SMALL_MODES:
        return quantization_unsupported(weight, AUTO_SMALL_MODES[mode])
    if mode not in (*QUANT_MODES, *AUTO_SMALL_MODES.values()):
        return f"unknown weight quantization {mode!r}; use one of {', '.join(QUANT_MODES)}"
    if weight.device.type != "cpu":
        return f"{mode} weight-only kernels are used on CPU only (got {weight.device.type})"
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"weights of dtype {weight.dtype} cannot be quantized"
    if mode == "int4" and not any(weight.shape[1] % g == 0 for g in INT4_GROUP_SIZES):
        return f"input width {weight.shape[1]} is not a multiple of {INT4_GROUP_SIZES[0]}"
    if mode == "int4" and weight.shape[0] % _INT4_BLOCK_N:
        return f"output width {weight.shape[0]} is not a multiple of {_INT4_BLOCK_N}"
    return None


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, pack: bool, quantization: str | None) -> Linear:
    """The linear the runner's forward calls for ``weight`` (and ``bias``); see the module docstring.

    A weight that ``quantization`` cannot handle (see :func:`quantization_unsupported`) stays a float linear.
    """
    if quantization is None or quantization_unsupported(weight, quantization) is not None:
        return FloatLinear(weight, bias, pack)
    if quantization in AUTO_SMALL_MODES:
        small = make_linear(weight, bias, pack, AUTO_SMALL_MODES[quantization])
        if isinstance(small, FloatLinear):  # the weight-only kernel is unavailable: one float copy
            return small
        return RowSwitchLinear(small, FloatLinear(weight, bias, pack=True), _AUTO_MAX_SMALL_ROWS[quantization])
    if quantization == "int8":
        return Int8Linear(weight, bias)
    group = next(g for g in INT4_GROUP_SIZES if weight.shape[1] % g == 0)
    try:
        return Int4Linear(weight, bias, group)
    except (RuntimeError, AttributeError) as exc:  # a torch without the CPU int4 op (AttributeError), another layout
        logger.warning("int4 quantization unavailable (%s); keeping %s weights", exc, weight.dtype)
        return FloatLinear(weight, bias, pack)

