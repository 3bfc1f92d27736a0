"""Fused CPU kernels for the compact runner's small decode steps, compiled once per machine.

A decode step of one user runs ~50 small PyTorch ops per layer (norms, rotary, cache writes, the
attention's batched matmuls, SiLU), each paying Python and dispatch overhead that is larger than
its arithmetic. :mod:`cpu_kernels.cpp` does the same work in four calls per layer (residual add
with RMSNorm, rotary with the cache write, attention over the slot cache, SiLU(gate) * up). The
matmuls stay PyTorch's, except that where the build has AVX-512 VNNI it also has int4 and int8
weight-only linears (:meth:`CpuKernels.int4_linear`, :meth:`CpuKernels.int8_linear`), which
:mod:`.quant` uses for decode-sized calls. :class:`~llm_server.engine.llama_runner.LlamaRunner` uses them for steps
of at most :data:`FUSED_MAX_ROWS` new tokens, :data:`FUSED_MAX_STEPS` per sequence.

The source is compiled with the system C++ compiler (``$CXX``, else ``g++``; about a second) into
``$XDG_CACHE_HOME/llm_server/kernels`` (``~/.cache`` by default), keyed by the source, the flags
and the CPU's feature flags (it is built with ``-march=native``), and loaded with ctypes. Without
a compiler, or with ``LLM_SERVER_CPU_KERNELS=0``, :func:`load` returns None and the runner keeps
its PyTorch ops (same results up to rounding: each kernel rounds its output once).

An image without a compiler ships a portable build instead (``python -m
llm_server.engine.cpu_kernels OUT``: x86-64-v3, i.e. AVX2 and FMA, on x86; the Containerfile's build
stage) and names it in ``LLM_SERVER_CPU_KERNELS_LIB``, used when no native build is cached.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
DISABLE_ENV = "LLM_SERVER_CPU_KERNELS"  # "0": never build or use the kernels
PREBUILT_ENV = "LLM_SERVER_CPU_KERNELS_LIB"  # a portable build made ahead (the container image's)
_COMMON_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp")  # libgomp: torch's OpenMP runtime
FLAGS = ("-march=native", "-mprefer-vector-width=512", *_COMMON_FLAGS)
#: The runner uses the kernels for steps of at most this many new tokens (rows x steps, padding included)
#: and at most FUSED_MAX_STEPS per row: decode steps up to 64 sequences, speculative verification,
#: short prompt chunks. Longer chunks stay with PyTorch (batched matmuls attend faster to 64+ queries of
#: a row: a 64-token chunk over 200 cached tokens took 67.7 ms fused against 62.8 ms; docs/engine.md).
FUSED_MAX_ROWS = 64
FUSED_MAX_STEPS = 16
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _L, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
_SIGNATURES = {
    "add_rms_norm": [_P, _P, _P, _P, _L, _L, _F],
    "rope_store": [_P, _P, _P, _L, _P, _P, _P, _P, _L, _L, _L, _L, _L, _L, _L],
    "attend": [_P, _P, _P, _P, _P, _L, _L, _L, _L, _L, _L, _L, _F, _L],
    "silu_mul": [_P, _P, _L, _L],
}
_VNNI_SIGNATURES = {
    "int8_linear": [_P, _P, _P, _P, _L, _L, _L, _L],
    "int4_linear": [_P, _P, _P, _P, _L, _L, _L, _L],
    "int4_body": [_P, _P, _P, _L, _P, _P, _L, _P, _P, _P, _P, _L, _L, _L, _F, _F, _L],
}


def _cpu_flags() -> str:
    """The CPU's feature flags (the library is built for them), or the machine name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def _library_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm_server" / "kernels"
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_flags().encode()).hexdigest()
    return root / f"cpu_kernels_{key[:16]}.so"


def _build(target: Path, flags: tuple[str, ...] = FLAGS) -> None:
    """Compile the source into ``target`` (written under a temporary name, then renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        compiler = os.environ.get("CXX", "g++")
        subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE)], check=True, capture_output=True,
                       timeout=300)
        os.replace(built, target)


def portable_flags() -> tuple[str, ...]:
    """Flags of a build for any recent CPU of this architecture (x86: x86-64-v3, AVX2 and FMA)."""
    return (("-march=x86-64-v3",) if platform.machine() in ("x86_64", "AMD64") else ()) + _COMMON_FLAGS


class Int4Body:
    """A model's decoder layers for :meth:`CpuKernels.int4_body`: per layer the 10 pointers the
    kernel reads (qkv, o, gate_up and down as nibbles and scale_zero, then ln2 and the next norm),
    and the shapes (hidden, qkv out, intermediate, heads, kv heads, head dim). Built once per
    runner; the tensors are kept alive with it. ``max_rows``: the most rows its linears take in int4."""

    def __init__(self, layers: Sequence[Sequence[torch.Tensor]], shape: tuple[int, ...], dtype: torch.dtype,
                 max_rows: int) -> None:
        self._tensors = [list(layer) for layer in layers]
        pointers = [t.data_ptr() for layer in self._tensors for t in layer]
        self._table = (ctypes.c_void_p * len(pointers))(*pointers)
        self._dims = (ctypes.c_long * 8)(*shape, 0, 0)  # + capacity and rope table, set per call
        self.layers, self.dtype, self.max_rows = len(self._tensors), dtype, max_rows


class CpuKernels:
    """Tensor-level wrappers over the compiled kernels (CPU, contiguous float32 or bfloat16)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._functions: dict[tuple[str, torch.dtype], Any] = {}  # ctypes functions
        #: the int8 and int4 linears exist where the build has AVX-512 VNNI (not in the portable build)
        self.has_vnni = bool(library.vnni_available())
        signatures = dict(_SIGNATURES, **(_VNNI_SIGNATURES if self.has_vnni else {}))
        for name, argtypes in signatures.items():
            for dtype, suffix in _SUFFIX.items():
                function = getattr(library, f"{name}_{suffix}")
                function.argtypes, function.restype = argtypes, None
                self._functions[name, dtype] = function

    @staticmethod
    def supports(dtype: torch.dtype) -> bool:
        return dtype in _SUFFIX

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
                     eps: float) -> None:
        """``x += delta`` (when given), then ``out = rms_norm(x) * weight``; x, delta, out [..., dim]."""
        dim = x.shape[-1]
        pointer = None if delta is None else _contiguous(delta).data_ptr()
        self._functions["add_rms_norm", x.dtype](x.data_ptr(), pointer, weight.data_ptr(), out.data_ptr(),
                                                 x.numel() // dim, dim, eps)

    def rope_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, shape: tuple[int, int, int], lo: int) -> torch.Tensor:
        """Rotary on the q and k of ``qkv`` [n, steps, width]; k and v written into one layer's cache
        (``keys`` [slots, kv_heads, head_dim, capacity], ``values`` [slots, kv_heads, capacity,
        head_dim]) at ``positions`` [n, steps], row i in slot lo + i. ``shape``: (heads, kv_heads,
        head_dim). Returns the rotated queries [n, steps, heads, head_dim]."""
        heads, kv_heads, head_dim = shape
        n, steps = positions.shape
        q = torch.empty((n, steps, heads, head_dim), dtype=qkv.dtype)
        self._functions["rope_store", qkv.dtype](
            _contiguous(qkv).data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.shape[0], positions.data_ptr(),
            q.data_ptr(), keys.data_ptr(), values.data_ptr(), n, steps, heads, kv_heads, head_dim, keys.shape[-1], lo,
        )
        return q

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               kv_heads: int, lo: int) -> torch.Tensor:
        """Attention of ``q`` [n, steps, heads, head_dim] over one layer's cache (as in
        :meth:`rope_store`): query (i, t) sees its slot's keys 0 .. positions[i, t]. Returns
        [n, steps, heads * head_dim]."""
        n, steps, heads, head_dim = q.shape
        out = torch.empty((n, steps, heads * head_dim), dtype=q.dtype)
        self._functions["attend", q.dtype](
            q.data_ptr(), keys.data_ptr(), values.data_ptr(), positions.data_ptr(), out.data_ptr(), n, steps, heads,
            kv_heads, head_dim, keys.shape[-1], lo, head_dim**-0.5, torch.get_num_threads(),
        )
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of ``gate_up`` [..., 2 * inter] (gate first); returns [..., inter]."""
        gate_up = _contiguous(gate_up)
        inter = gate_up.shape[-1] // 2
        out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype)
        self._functions["silu_mul", gate_up.dtype](gate_up.data_ptr(), out.data_ptr(), out.numel() // inter, inter)
        return out

    def int8_linear(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """``x [rows, in] @ (qweight [out, in] int8 * scales [out])^T``, ``in`` a multiple of 64, x
        quantized to int8 per block of 32 inputs on the way (VNNI dot products; only where
        :attr:`has_vnni`)."""
        return self._vnni_linear("int8_linear", x, qweight, scales)

    def int4_linear(self, x: torch.Tensor, nibbles: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
        """``x [rows, in] @ W^T`` for an int4 ``W = (q - 8) * scale + zero`` per group of 32 inputs:
        ``nibbles`` [out, in / 2] uint8 and ``scale_zero`` in x's dtype, laid out by
        ``quant._vnni_int4_layout`` (16 output rows per vector lane set; see cpu_kernels.cpp);
        ``out`` a multiple of 16, ``in`` of 64. x is quantized to int8 per group on the way (VNNI
        dot products; only where :attr:`has_vnni`)."""
        return self._vnni_linear("int4_linear", x, nibbles, scale_zero)

    def int4_body(self, body: Int4Body, x: torch.Tensor, h: torch.Tensor, caches: tuple[torch.Tensor, torch.Tensor],
                  rope: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor, lo: int, eps: float) -> None:
        """Every decoder layer of a small step in one call (the per-layer calls of the compact
        runner's fused step, in the same order; see cpu_kernels.cpp): ``x`` [n, steps, hidden] the
        residual stream, ``h`` its first normed input on entry and the final norm's output on return.
        ``caches``: the slot cache's keys and values of every layer; ``rope``: cos and sin tables."""
        keys, values = caches
        cos, sin = rope
        n, steps = positions.shape
        body._dims[6], body._dims[7] = keys.shape[-1], cos.shape[0]
        self._functions["int4_body", x.dtype](
            x.data_ptr(), h.data_ptr(), ctypes.addressof(body._table), body.layers, keys.data_ptr(),
            values.data_ptr(), keys.stride(0), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(),
            ctypes.addressof(body._dims), n, steps, lo, eps, body._dims[5] ** -0.5, torch.get_num_threads(),
        )

    def _vnni_linear(self, name: str, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        rows, width = x.shape
        out = torch.empty((rows, weight.shape[0]), dtype=x.dtype)
        self._functions[name, x.dtype](_contiguous(x).data_ptr(), weight.data_ptr(), scales.data_ptr(), out.data_ptr(),
                                       rows, weight.shape[0], width, torch.get_num_threads())
        return out


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.is_contiguous() else tensor.contiguous()


@functools.cache
def load() -> CpuKernels | None:
    """The compiled kernels (built on first use, then cached on disk), or None where they cannot be
    built or ``LLM_SERVER_CPU_KERNELS=0``."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    try:
        path = _library_path()
        prebuilt = Path(os.environ.get(PREBUILT_ENV) or "/nonexistent")
        if not path.exists() and prebuilt.is_file():
            path = prebuilt
        elif not path.exists():
            _build(path)
        kernels = CpuKernels(ctypes.CDLL(str(path)))
        logger.info("fused CPU kernels: %s", path)
        return kernels
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        detail = getattr(error, "stderr", b"") or b""
        logger.warning("fused CPU kernels unavailable (%s %s); the runner uses PyTorch ops",
                       error, detail.decode(errors="replace")[-500:])
        return None


if __name__ == "__main__":  # the container image's build stage: python -m llm_server.engine.cpu_kernels OUT
    import sys

    _build(Path(sys.argv[1]), portable_flags())
    print(f"built {sys.argv[1]} ({' '.join(portable_flags())})")
