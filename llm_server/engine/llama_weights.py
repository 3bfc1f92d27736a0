"""Weights of the compact Llama forward: read from the HF model, fused, packed or quantized.

q/k/v and gate/up are fused into single matmuls; each (fused) weight becomes a :mod:`.quant`
linear (oneDNN-packed float, or weight-only int8 / int4). When the HF model stays in use (the
Python API's ``model.generate``), its parameters become views of the fused tensors. When the
engine owns the model (``free``), the HF module's copies of the re-laid weights are dropped, so
one copy of each weight stays resident: the one in the layout the forward reads. The input
embedding and norms are used as they are (a tied LM head keeps the embedding alive).
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm_server.engine import cpu_kernels
from llm_server.engine.quant import ENGINE_OWNED_ATTR, Linear, make_linear, vnni_int4


def _fuse(modules: Sequence[torch.nn.Linear], keep_views: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears; with ``keep_views`` their parameters become
    views of it (no second copy while the HF model keeps its weights)."""
    weight = torch.cat([m.weight.detach() for m in modules])
    sizes = [m.weight.shape[0] for m in modules]
    if keep_views:
        for module, part in zip(modules, weight.split(sizes), strict=True):
            module.weight.data = part
    if all(m.bias is None for m in modules):
        return weight, None
    bias = torch.cat(
        [m.bias.detach() if m.bias is not None else weight.new_zeros(m.weight.shape[0]) for m in modules]
    )
    for module, part in zip(modules, bias.split(sizes), strict=True):
        if module.bias is not None:
            module.bias.data = part
    return weight, bias


def _bias(module: torch.nn.Linear) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


def _drop_weight(module: torch.nn.Linear) -> None:
    """Replace a linear's weight by a meta tensor of the same shape: its memory is freed, and
    calling the module afterwards raises instead of computing on meta tensors."""
    module.weight = torch.nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
    module.register_forward_pre_hook(_refuse)


def _refuse(module: torch.nn.Module, args: Any) -> None:
    raise RuntimeError(
        "this model's weights were handed to the serving engine's runner (mark_engine_owned); "
        "load another copy to run the model itself"
    )


def mark_engine_owned(model: Any) -> None:
    """Say that only the serving engine will run ``model``: its runner may then free the HF
    module's copies of the weights it re-lays (see :class:`LlamaRunner`)."""
    setattr(model, ENGINE_OWNED_ATTR, True)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@dataclass
class LayerWeights:
    """One decoder layer as the compact forward reads it."""

    ln1: torch.Tensor
    qkv: Linear
    o: Linear
    ln2: torch.Tensor
    gate_up: Linear
    down: Linear


def read_layer(layer: Any, pack: bool, free: bool, mode: str | None) -> LayerWeights:
    """One decoder layer's weights in the forward's layout (q/k/v and gate/up fused)."""
    attn, mlp = layer.self_attn, layer.mlp

    def linear(modules: list[torch.nn.Linear]) -> Linear:
        if len(modules) > 1:
            weight, bias = _fuse(modules, keep_views=not free)
        else:
            weight, bias = modules[0].weight.detach(), _bias(modules[0])
        made = make_linear(weight, bias, pack, mode)
        if free:  # the runner now holds the weight in the layout it reads
            for module in modules:
                _drop_weight(module)
        return made

    return LayerWeights(
        ln1=layer.input_layernorm.weight.detach(),
        qkv=linear([attn.q_proj, attn.k_proj, attn.v_proj]),
        o=linear([attn.o_proj]),
        ln2=layer.post_attention_layernorm.weight.detach(),
        gate_up=linear([mlp.gate_proj, mlp.up_proj]),
        down=linear([mlp.down_proj]),
    )


def read_head(model: Any, pack: bool, free: bool, mode: str | None) -> Linear:
    """The LM head (quantized with ``mode``); its HF weight is dropped only when not tied to the
    input embedding, which the forward keeps using."""
    head = model.lm_head
    made = make_linear(head.weight.detach(), _bias(head), pack, mode)
    tied = head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if free and not tied:
        _drop_weight(head)
    return made


def int4_body(layers: Sequence[LayerWeights], norm: torch.Tensor, shape: tuple[int, int, int],
              dtype: torch.dtype) -> cpu_kernels.Int4Body | None:
    """The layers as one fused-kernel call sees them (:class:`~.cpu_kernels.Int4Body`), when every
    linear of every layer is a VNNI int4 one without bias; else None. ``shape``: (heads, kv heads,
    head dim)."""
    found = [vnni_int4(linear) for layer in layers for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    pairs = [entry for entry in found if entry is not None]
    if not layers or len(pairs) != len(found):
        return None
    linears = [linear for linear, _ in pairs]
    next_norms = [layer.ln1 for layer in layers[1:]] + [norm]
    rows = [[t for linear in linears[4 * i : 4 * i + 4] for t in (linear.nibbles, linear.scale_zero)]
            + [layer.ln2, next_norm] for i, (layer, next_norm) in enumerate(zip(layers, next_norms, strict=True))]
    dims = (int(norm.shape[0]), linears[0].out_features, linears[2].out_features // 2, *shape)
    return cpu_kernels.Int4Body(rows, dims, dtype, min(limit for _, limit in pairs))
