"""Compact batched forward for Llama-family models (Llama, SmolLM, Mistral, Qwen2 layouts).

It reads the Hugging Face model's weights (q/k/v and gate/up fused into single matmuls; the
HF module's parameters become views of the fused tensors, so no memory is duplicated and the
HF model keeps working) and keeps its own KV cache, allocated once per engine:
``[layers, slots, kv_heads, capacity, head_dim]`` for keys and for values, one slot per
running sequence. A step runs every sequence of the batch in one forward: their slots are
kept contiguous so attention reads cache views (no gather), and only the cache up to the
longest sequence of the batch is attended to. The capacity grows (by doubling) when a
sequence needs it and shrinks back when the engine is idle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llm_server.engine.runners import KVHandle, ModelRunner

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
_INITIAL_CAPACITY = 256
_CAPACITY_STEP = 128


def _rope_type(config: Any) -> str:
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict):
            return str(params.get("rope_type") or params.get("type") or "default")
    return "default"


def unsupported_reason(model: Any) -> str | None:
    """None when :class:`LlamaRunner` can run ``model``; otherwise why not."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} has no compact forward"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not supported"
    if _rope_type(config) not in STATIC_ROPE_TYPES:
        return f"rope type {_rope_type(config)!r} is not supported"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        return "sliding-window attention is not supported"
    try:
        layer = model.model.layers[0]
        _ = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj)
        _ = (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
        _ = (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm, model.model.rotary_emb)
        _ = model.lm_head
    except (AttributeError, IndexError):
        return "the model does not have the Llama module layout"
    if hasattr(layer.self_attn, "q_norm"):
        return "per-head q/k norms are not supported"
    return None


def _fuse(modules: Sequence[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears; their parameters become views of it."""
    weight = torch.cat([m.weight.detach() for m in modules])
    sizes = [m.weight.shape[0] for m in modules]
    for module, part in zip(modules, weight.split(sizes)):
        module.weight.data = part
    if all(m.bias is None for m in modules):
        return weight, None
    bias = torch.cat(
        [m.bias.detach() if m.bias is not None else weight.new_zeros(m.weight.shape[0]) for m in modules]
    )
    for module, part in zip(modules, bias.split(sizes)):
        if module.bias is not None:
            module.bias.data = part
    return weight, bias


def _bias(module: torch.nn.Linear) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


@dataclass
class _Layer:
    ln1: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    ln2: torch.Tensor
    wgu: torch.Tensor
    bgu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly the HF Llama RMSNorm: statistics in float32, result in the input dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class LlamaRunner(ModelRunner):
    """Batched decode and prefill of a Llama-family model over an engine-owned KV cache."""

    def __init__(self, model: Any, max_slots: int, max_context: int) -> None:
        config = model.config
        inner = model.model
        self.device = inner.embed_tokens.weight.device
        self.dtype = inner.embed_tokens.weight.dtype
        self.num_slots = max_slots
        self.max_context = max_context
        self._heads = int(config.num_attention_heads)
        self._kv_heads = int(getattr(config, "num_key_value_heads", None) or self._heads)
        self._head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self._heads)
        self._eps = float(config.rms_norm_eps)
        with torch.no_grad():
            self._layers = [self._read_layer(layer) for layer in inner.layers]
            self._embed = inner.embed_tokens.weight.detach()
            self._norm = inner.norm.weight.detach()
            self._lm_head = model.lm_head.weight.detach()
            self._lm_bias = _bias(model.lm_head)
            self._cos, self._sin = self._rope_tables(inner.rotary_emb, max_context)
        self.vocab_size = int(self._lm_head.shape[0])
        self._owner: list[KVHandle | None] = [None] * max_slots
        self._keys: torch.Tensor | None = None  # [layers, slots, kv_heads, capacity, head_dim]
        self._values: torch.Tensor | None = None
        self._capacity = 0

    # --- weights ------------------------------------------------------------------------
    @staticmethod
    def _read_layer(layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        wqkv, bqkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        wgu, bgu = _fuse([mlp.gate_proj, mlp.up_proj])
        return _Layer(
            ln1=layer.input_layernorm.weight.detach(),
            wqkv=wqkv,
            bqkv=bqkv,
            wo=attn.o_proj.weight.detach(),
            bo=_bias(attn.o_proj),
            ln2=layer.post_attention_layernorm.weight.detach(),
            wgu=wgu,
            bgu=bgu,
            wd=mlp.down_proj.weight.detach(),
            bd=_bias(mlp.down_proj),
        )

    def _rope_tables(self, rotary: Any, max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin for every position, computed by the model's own rotary module."""
        positions = torch.arange(max_context, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = rotary(probe, positions)
        half = self._head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(device=self.device, dtype=self.dtype)
        return cos[0].contiguous(), (sin[0] * sign).contiguous()

    # --- slots and cache ----------------------------------------------------------------
    def release(self, handle: KVHandle) -> None:
        if handle.slot >= 0 and self._owner[handle.slot] is handle:
            self._owner[handle.slot] = None
        handle.slot = -1
        handle.length = 0

    def idle(self) -> None:
        if self._capacity > _INITIAL_CAPACITY and all(o is None for o in self._owner):
            self._keys = self._values = None
            self._capacity = 0

    def _take_slot(self, handle: KVHandle) -> None:
        slot = self._owner.index(None)  # the scheduler never admits more than num_slots
        self._owner[slot] = handle
        handle.slot = slot

    def _ensure_capacity(self, needed: int) -> None:
        if self._keys is not None and needed <= self._capacity:
            return
        capacity = max(needed, 2 * self._capacity, _INITIAL_CAPACITY)
        capacity = -(-capacity // _CAPACITY_STEP) * _CAPACITY_STEP
        shape = (len(self._layers), self.num_slots, self._kv_heads, capacity, self._head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self._keys is not None and self._values is not None:
            keys[:, :, :, : self._capacity] = self._keys
            values[:, :, :, : self._capacity] = self._values
        self._keys, self._values, self._capacity = keys, values, capacity

    def _move(self, src: int, dst: int) -> None:
        """Exchange the contents (and owners) of two slots."""
        assert self._keys is not None and self._values is not None
        for cache in (self._keys, self._values):
            if self._owner[dst] is None:
                cache[:, dst] = cache[:, src]
            else:
                saved = cache[:, dst].clone()
                cache[:, dst] = cache[:, src]
                cache[:, src] = saved
        moving, other = self._owner[src], self._owner[dst]
        self._owner[dst], self._owner[src] = moving, other
        if moving is not None:
            moving.slot = dst
        if other is not None:
            other.slot = src

    def _make_contiguous(self, batch: Sequence[KVHandle]) -> int:
        """Rearrange slots so ``batch`` occupies consecutive slots; return the first one."""
        n = len(batch)
        lo = min(min(h.slot for h in batch), self.num_slots - n)
        members = {id(h) for h in batch}
        outside = [h for h in batch if not lo <= h.slot < lo + n]
        if outside:
            free = [s for s in range(lo, lo + n) if self._owner[s] is None or id(self._owner[s]) not in members]
            for handle, slot in zip(outside, free):
                self._move(handle.slot, slot)
        return lo

    # --- forward ------------------------------------------------------------------------
    def forward(self, handles: Sequence[KVHandle], tokens: Sequence[list[int]]) -> torch.Tensor:
        for handle in handles:
            if handle.slot < 0:
                self._take_slot(handle)
        steps = max(len(t) for t in tokens)
        self._ensure_capacity(max(h.length for h in handles) + steps)
        lo = self._make_contiguous(handles)
        order = sorted(range(len(handles)), key=lambda i: handles[i].slot)
        starts = [handles[i].length for i in order]
        lengths = [len(tokens[i]) for i in order]
        padded = [tokens[i] + [0] * (steps - len(tokens[i])) for i in order]
        logits = self._run(lo, padded, starts, lengths)
        for handle, ids in zip(handles, tokens):
            handle.length += len(ids)
        if order == sorted(order):
            return logits
        inverse = [0] * len(order)
        for row, i in enumerate(order):
            inverse[i] = row
        return logits[inverse]

    def _run(self, lo: int, padded: list[list[int]], starts: list[int], lengths: list[int]) -> torch.Tensor:
        assert self._keys is not None and self._values is not None
        n, steps = len(padded), len(padded[0])
        heads, kv_heads, head_dim, capacity = self._heads, self._kv_heads, self._head_dim, self._capacity
        device = self.device
        tokens = torch.tensor(padded, dtype=torch.long, device=device)
        start = torch.tensor(starts, dtype=torch.long, device=device)
        positions = start.unsqueeze(1) + torch.arange(steps, device=device)  # [n, steps]
        rope_positions = positions.clamp(max=self._cos.shape[0] - 1)
        cos = self._cos[rope_positions].unsqueeze(2)  # [n, steps, 1, head_dim]
        sin = self._sin[rope_positions].unsqueeze(2)
        fresh = all(s == 0 for s in starts)  # a prefill from scratch attends only to its own tokens
        key_len = max(starts) + steps
        bias = None if fresh else self._attention_bias(positions, key_len)
        slots = torch.arange(lo, lo + n, device=device)
        layer_stride = self.num_slots * kv_heads * capacity
        flat_index = (
            (slots.view(n, 1, 1) * kv_heads + torch.arange(kv_heads, device=device).view(1, 1, kv_heads)) * capacity
            + positions.unsqueeze(2)
        ).reshape(-1)  # [n * steps * kv_heads] rows of the flattened cache of one layer
        flat_keys = self._keys.view(-1, head_dim)
        flat_values = self._values.view(-1, head_dim)
        q_width = heads * head_dim
        qk_width = (heads + kv_heads) * head_dim

        x = F.embedding(tokens, self._embed)  # [n, steps, hidden]
        for index, layer in enumerate(self._layers):
            h = _rms_norm(x, layer.ln1, self._eps)
            qkv = F.linear(h, layer.wqkv, layer.bqkv)
            qk = qkv[..., :qk_width].view(n, steps, heads + kv_heads, head_dim)
            qk = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin
            q = qk[:, :, :heads].transpose(1, 2)  # [n, heads, steps, head_dim]
            k = qk[:, :, heads:]  # [n, steps, kv_heads, head_dim]
            v = qkv[..., qk_width:].view(n, steps, kv_heads, head_dim)
            rows = flat_index + index * layer_stride
            flat_keys.index_copy_(0, rows, k.reshape(-1, head_dim))
            flat_values.index_copy_(0, rows, v.reshape(-1, head_dim))
            if fresh:
                attn = F.scaled_dot_product_attention(
                    q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
                )
                attn = attn.transpose(1, 2).reshape(n, steps, q_width)
            else:
                attn = self._cached_attention(q, index, lo, key_len, bias)
            x = x + F.linear(attn, layer.wo, layer.bo)
            h = _rms_norm(x, layer.ln2, self._eps)
            gate, up = F.linear(h, layer.wgu, layer.bgu).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.wd, layer.bd)

        if steps == 1:
            last = x[:, 0]
        else:
            last = x[torch.arange(n, device=device), torch.tensor(lengths, device=device) - 1]
        last = _rms_norm(last, self._norm, self._eps)
        return F.linear(last, self._lm_head, self._lm_bias).float()

    def _attention_bias(self, positions: torch.Tensor, key_len: int) -> torch.Tensor:
        """Additive float32 mask [n, 1, groups * steps, key_len]: query t of a row sees keys <= its position."""
        n, steps = positions.shape
        groups = self._heads // self._kv_heads
        visible = torch.arange(key_len, device=self.device) <= positions.unsqueeze(2)  # [n, steps, key_len]
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=self.device).masked_fill_(~visible, float("-inf"))
        return bias.unsqueeze(1).expand(n, groups, steps, key_len).reshape(n, 1, groups * steps, key_len)

    def _cached_attention(
        self, q: torch.Tensor, index: int, lo: int, key_len: int, bias: torch.Tensor
    ) -> torch.Tensor:
        """Attention of new queries [n, heads, steps, head_dim] over the cache, grouped-query style.

        Plain batched matmuls: for a handful of queries per sequence this is several times faster
        on CPU than ``scaled_dot_product_attention`` (whose flash kernel is tuned for long queries).
        """
        assert self._keys is not None and self._values is not None
        n, heads, steps, head_dim = q.shape
        kv_heads = self._kv_heads
        keys = self._keys[index, lo : lo + n, :, :key_len]  # [n, kv_heads, key_len, head_dim] (a view)
        values = self._values[index, lo : lo + n, :, :key_len]
        grouped = q.reshape(n, kv_heads, (heads // kv_heads) * steps, head_dim)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).float().mul_(head_dim**-0.5).add_(bias)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, values).view(n, heads, steps, head_dim)
        return out.transpose(1, 2).reshape(n, steps, heads * head_dim)
