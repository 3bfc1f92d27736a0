"""The generic runner's attention function, registered with transformers' ``AttentionInterface``.

A model whose ``config._attn_implementation`` is :data:`ATTENTION_NAME` calls
:func:`batched_attention` from every attention layer with that layer's queries, keys and values
(after its own projections, q/k norms and rotary embedding). The function writes the new keys and
values into the engine's :class:`~.kv_cache.SlotCache` (the layout ``LlamaRunner`` uses) and
attends over the cache, the batch's slots read as contiguous views, with a mask built from each
token's position: causal, plus the layer's sliding window when it has one. Soft-capped scores
(Gemma 2) and attention sinks (GPT-OSS) are applied as the model's own eager attention does.

The step being run (cache, slots, positions, masks) is a :class:`StepContext` set by the runner
in a context variable around the model's forward, so the model's own code passes nothing extra.
Masks are built once per step and window, not per layer. No mask function is registered for
:data:`ATTENTION_NAME`, so the model's mask creation is skipped (transformers returns None for a
custom attention without one).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llm_server.engine.kv_cache import SlotCache

ATTENTION_NAME = "llm_server_batched"


@dataclass
class StepContext:
    """What every attention layer of one batched forward shares."""

    cache: SlotCache
    lo: int  # the batch occupies cache slots lo .. lo + n - 1
    positions: torch.Tensor  # [n, steps] position of each new token (padding after a row's end)
    fresh: bool  # every row starts at position 0: full-attention layers attend over their own tokens
    key_slots: torch.Tensor  # [n, 1] cache rows, with ``positions``: where each new key goes
    layers_seen: set[int] = field(default_factory=set)
    _biases: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)

    def bias(self, window: int | None, groups: int) -> torch.Tensor:
        """Additive float32 mask [n, 1, groups * steps, capacity]: query t sees the keys at positions
        ``<= t`` (and ``> t - window`` when the layer has a sliding window)."""
        key = (window, groups)
        if key not in self._biases:
            n, steps = self.positions.shape
            capacity = self.cache.capacity
            keys = torch.arange(capacity, device=self.positions.device)
            query = self.positions.unsqueeze(2)  # [n, steps, 1]
            visible = keys <= query
            if window is not None:
                visible &= keys > query - window
            bias = torch.zeros(visible.shape, dtype=torch.float32, device=self.positions.device)
            bias.masked_fill_(~visible, float("-inf"))
            self._biases[key] = bias.unsqueeze(1).expand(n, groups, steps, capacity).reshape(
                n, 1, groups * steps, capacity
            )
        return self._biases[key]


CURRENT_STEP: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("llm_server_step", default=None)


def _layer_window(module: Any, kwargs: dict[str, Any]) -> int | None:
    """The sliding window of this layer (None: full attention)."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    return int(window) if window else None


def _store(ctx: StepContext, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write new keys and values [n, kv_heads, steps, head_dim] into layer ``layer``'s cache."""
    keys = ctx.cache.keys[layer]  # [rows, kv_heads, head_dim, capacity]
    values = ctx.cache.values[layer]  # [rows, kv_heads, capacity, head_dim]
    k = key.transpose(1, 2)  # [n, steps, kv_heads, head_dim]
    keys[ctx.key_slots, :, :, ctx.positions] = k.to(keys.dtype)
    values[ctx.key_slots, :, ctx.positions] = value.transpose(1, 2).to(values.dtype)


def _softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Softmax of scores [n, kv_heads, groups * steps, keys] with one extra logit per query head
    (GPT-OSS's sinks, [heads]) that takes probability mass but has no value."""
    n, _, rows, _ = scores.shape
    groups = sinks.numel() // kv_heads
    steps = rows // groups
    sink = sinks.float().view(1, kv_heads, groups, 1, 1).expand(n, kv_heads, groups, steps, 1)
    combined = torch.cat([scores, sink.reshape(n, kv_heads, rows, 1)], dim=-1)
    return torch.softmax(combined, dim=-1)[..., :-1]


def _cached_attention(
    ctx: StepContext, module: Any, layer: int, query: torch.Tensor, scaling: float, window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Attention of queries [n, heads, steps, head_dim] over the cache; returns [n, steps, heads, head_dim].

    Plain batched matmuls over contiguous views (as ``LlamaRunner``): for a few queries per
    sequence several times faster on CPU than ``scaled_dot_product_attention``.
    """
    n, heads, steps, head_dim = query.shape
    kv_heads = ctx.cache.keys.shape[2]
    groups = heads // kv_heads
    capacity = ctx.cache.capacity
    lo = ctx.lo
    keys_t = ctx.cache.keys[layer, lo : lo + n].flatten(0, 1)  # [n * kv_heads, head_dim, capacity]
    values = ctx.cache.values[layer, lo : lo + n].flatten(0, 1)  # [n * kv_heads, capacity, head_dim]
    grouped = query.to(keys_t.dtype).reshape(n * kv_heads, groups * steps, head_dim)
    scores = torch.bmm(grouped, keys_t).view(n, kv_heads, groups * steps, capacity).float().mul_(scaling)
    if softcap:
        scores = torch.tanh(scores / softcap).mul_(softcap)
    scores.add_(ctx.bias(window, groups))
    sinks = getattr(module, "sinks", None)
    if isinstance(sinks, torch.Tensor):
        probs = _softmax_with_sinks(scores, sinks, kv_heads)
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs.to(values.dtype).view(n * kv_heads, groups * steps, capacity), values)
    return out.view(n, heads, steps, head_dim).transpose(1, 2).to(query.dtype)


def batched_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q [n, heads, steps, d], k/v [n, kv_heads, steps, d];
    returns ([n, steps, heads, d], None)."""
    ctx = CURRENT_STEP.get()
    if ctx is None:
        raise RuntimeError(f"attention {ATTENTION_NAME!r} runs only inside the engine's batched forward")
    layer = int(module.layer_idx)
    ctx.layers_seen.add(layer)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    window = _layer_window(module, kwargs)
    softcap = kwargs.get("softcap")
    _store(ctx, layer, key, value)
    steps = query.shape[2]
    simple = not softcap and not isinstance(getattr(module, "sinks", None), torch.Tensor)
    if ctx.fresh and simple and (window is None or window >= steps):
        out = F.scaled_dot_product_attention(
            query, key.to(query.dtype), value.to(query.dtype), is_causal=True, scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2), None
    return _cached_attention(ctx, module, layer, query, scale, window, softcap), None


def register() -> None:
    """Register :func:`batched_attention` as :data:`ATTENTION_NAME` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, batched_attention)


__all__ = ["ATTENTION_NAME", "CURRENT_STEP", "StepContext", "batched_attention", "register"]
