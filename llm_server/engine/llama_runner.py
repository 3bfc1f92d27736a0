"""Compact batched forward for Llama-family models (Llama, SmolLM, Mistral, Qwen2 layouts).

It reads the Hugging Face model's weights (:mod:`.llama_weights`: q/k/v and gate/up fused into
single matmuls) and on CPU hands them to oneDNN pre-packed (``mkldnn._linear_pointwise``: 1.3-2x
faster than ``F.linear`` for the small batches of a decode step, bit-identical in bfloat16), or
quantizes them to weight-only int8 / int4 (:mod:`.quant`).

The KV cache (:mod:`.kv_cache`) has one slot per running sequence and grows with the slots and
positions in use. A step runs every sequence of the batch in one forward: their slots are kept
contiguous, so attention reads the batch's keys and values as contiguous views of the cache over
its whole capacity, masking what each sequence has not written: no gather, and no per-layer copy
inside the batched matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llm_server.engine import cpu_kernels
from llm_server.engine.kv_cache import SlotCache
from llm_server.engine.llama_weights import LayerWeights, int4_body, read_head, read_layer, release_memory
from llm_server.engine.quant import (
    ENGINE_OWNED_ATTR,
    HEAD_QUANTIZATION,
    QUANT_MODES,
    QUANTIZATION_ATTR,
    Linear,
    fast_rows,
    streamed_tensors,
)
from llm_server.engine.runner import KVHandle, ModelRunner, every_position_rows
from llm_server.engine.weight_arena import pack_streamed

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


def _rope_type(config: Any) -> str:
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict):
            return str(params.get("rope_type") or params.get("type") or "default")
    return "default"


def unsupported_reason(model: Any) -> str | None:
    """None when :class:`LlamaRunner` can run ``model``; otherwise why not."""
    config: Any = getattr(model, "config", None)
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
    weights = list(model.parameters())
    devices = {p.device for p in weights}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return "weights spread over several devices (or offloaded)"
    if any(not p.dtype.is_floating_point or p.dtype != weights[0].dtype for p in weights):
        return "weights of mixed or non-float dtypes (a quantized model?)"
    return None


@dataclass
class _StepInputs:
    """What every layer of one forward shares."""

    tokens: torch.Tensor  # [n, steps] ids, short rows padded
    lo: int  # the batch occupies cache slots lo .. lo + n - 1
    positions: torch.Tensor  # [n, steps] position of each token
    cos: torch.Tensor  # [n, steps, 1, head_dim] rotary tables at those positions
    sin: torch.Tensor
    bias: torch.Tensor | None  # attention mask over the cache; None: a fresh prefill (causal over its own tokens)
    key_slots: torch.Tensor  # [n, 1] with ``positions``: where each new key goes
    value_rows: torch.Tensor  # [n * steps * kv_heads] rows of one layer's value cache, flattened
    keys: torch.Tensor | None  # [layers, n * kv_heads, head_dim, capacity]: the batch's cached keys (views)
    values: torch.Tensor | None  # [layers, n * kv_heads, capacity, head_dim]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama RMSNorm as one fused op (``F.rms_norm``: statistics in float32). Bit-identical to
    the HF module in float32; in bfloat16 it rounds once where HF rounds twice (before and after
    the weight), so it may differ from HF in the last bit."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class LlamaRunner(ModelRunner):
    """Batched decode and prefill of a Llama-family model over an engine-owned KV cache.

    ``quantization`` ("int8", "int4", "auto" or None) selects weight-only quantized linears on CPU
    (:mod:`.quant`); None reads the choice :func:`~llm_server.helper_functionality.model_loading.initialize`
    recorded on the model. ``free_model_weights``: drop the HF module's copies of the weights the
    runner re-laid (packed or quantized), so only one copy stays resident; the HF model can then no
    longer run those layers. None reads :func:`mark_engine_owned`'s mark on the model.
    ``head_quantization``: the LM head's ("default": :data:`HEAD_QUANTIZATION`).
    ``fused_kernels``: on CPU, run steps of few new tokens over cached context (at most
    :data:`~.cpu_kernels.FUSED_MAX_ROWS`, :data:`~.cpu_kernels.FUSED_MAX_STEPS` per row) with
    :mod:`.cpu_kernels` (where they can be built).
    """

    def __init__(
        self,
        model: Any,
        max_slots: int,
        max_context: int,
        pack_weights: bool = True,
        quantization: str | None = None,
        free_model_weights: bool | None = None,
        head_quantization: str | None = "default",
        fused_kernels: bool = True,
    ) -> None:
        config = model.config
        inner = model.model
        self.device = inner.embed_tokens.weight.device
        self.dtype = inner.embed_tokens.weight.dtype
        self.num_slots = max_slots
        self.max_context = max_context
        self.quantization = quantization if quantization is not None else getattr(model, QUANTIZATION_ATTR, None)
        if self.quantization is not None and self.quantization not in QUANT_MODES:
            raise ValueError(f"unknown weight quantization {self.quantization!r}; use one of {QUANT_MODES}")
        if head_quantization == "default":
            head_quantization = HEAD_QUANTIZATION.get(self.quantization) if self.quantization else None
        free = bool(getattr(model, ENGINE_OWNED_ATTR, False)) if free_model_weights is None else free_model_weights
        self._heads = int(config.num_attention_heads)
        self._kv_heads = int(getattr(config, "num_key_value_heads", None) or self._heads)
        self._head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self._heads)
        self._eps = float(config.rms_norm_eps)
        with torch.no_grad():
            self._layers = [read_layer(layer, pack_weights, free, self.quantization) for layer in inner.layers]
            self._embed = inner.embed_tokens.weight.detach()
            self._norm = inner.norm.weight.detach()
            self._lm_head = read_head(model, pack_weights, free, head_quantization)
            self._cos, self._sin = self._rope_tables(inner.rotary_emb, max_context)
        streamed = [t for lin in (*self._linears(), self._lm_head) for t in streamed_tensors(lin)]
        self._arena = pack_streamed(streamed) if self.device.type == "cpu" else None  # before the body's pointers
        release_memory()  # the originals (when freed), the quantization's float temporaries, the moved copies
        self.vocab_size = self._lm_head.out_features
        kernels = cpu_kernels.load() if fused_kernels and self.device.type == "cpu" else None
        self._kernels = kernels if kernels is not None and kernels.supports(self.dtype) else None
        shape = (self._heads, self._kv_heads, self._head_dim)
        self._body = int4_body(self._layers, self._norm, shape, self.dtype) if self._kernels is not None else None
        self.fast_tokens = fast_rows(self._linears())
        self._cache = SlotCache(len(self._layers), self._kv_heads, self._head_dim, max_slots, max_context,
                                self.dtype, self.device)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights the linears read per forward (LM head included)."""
        return sum(lin.weight_bytes for lin in self._linears()) + self._lm_head.weight_bytes

    def _linears(self) -> list[Linear]:
        """The decoder layers' linears, in the order a forward calls them."""
        return [lin for layer in self._layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]

    # --- weights ------------------------------------------------------------------------
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
        self._cache.release(handle)

    def idle(self) -> None:
        self._cache.idle()

    @property
    def slot_cache(self) -> SlotCache:
        return self._cache

    @property
    def cache_shape(self) -> tuple[int, int]:
        """(slots, positions) the KV cache holds now."""
        return self._cache.rows, self._cache.capacity

    @property
    def cache_bytes(self) -> int:
        """Bytes the KV cache holds now."""
        return self._cache.nbytes

    # --- forward ------------------------------------------------------------------------
    speculates = True  # forward(every=True) + rollback: speculative decoding (engine/speculative.py)

    def forward(self, handles: Sequence[KVHandle], tokens: Sequence[list[int]], every: bool = False) -> torch.Tensor:
        for handle in handles:
            if handle.slot < 0:
                self._cache.take_slot(handle)
        steps = max(len(t) for t in tokens)
        self._cache.fit(max(h.length for h in handles) + steps)
        lo = self._cache.make_contiguous(handles)
        order = sorted(range(len(handles)), key=lambda i: handles[i].slot)
        starts = [handles[i].length for i in order]
        lengths = [len(tokens[i]) for i in order]
        padded = [tokens[i] + [0] * (steps - len(tokens[i])) for i in order]
        logits = self._run(lo, padded, starts, lengths, every)
        for handle, ids in zip(handles, tokens, strict=True):
            handle.length += len(ids)
        if every:  # speculative decoding: every new token's logits, in the caller's order
            return logits if order == sorted(order) else logits[every_position_rows(order, lengths)]
        if order == sorted(order):
            return logits
        inverse = [0] * len(order)
        for row, i in enumerate(order):
            inverse[i] = row
        return logits[inverse]

    def _run(self, lo: int, padded: list[list[int]], starts: list[int], lengths: list[int],
             every: bool = False) -> torch.Tensor:
        """The forward of a batch in slots ``lo..lo+n``: [n, vocab] logits of each row's last token
        (``every``: of each row's every real token, row after row)."""
        steps = len(padded[0])
        small = len(padded) * steps <= cpu_kernels.FUSED_MAX_ROWS and steps <= cpu_kernels.FUSED_MAX_STEPS
        if self._kernels is not None and small and any(starts):
            return self._run_fused(self._kernels, lo, padded, starts, lengths, every)
        step = self._step_inputs(lo, padded, starts)
        x = F.embedding(step.tokens, self._embed)  # [n, steps, hidden]
        for index, layer in enumerate(self._layers):  # residuals added in place: no new tensor per layer
            x.add_(self._attention(index, layer, _rms_norm(x, layer.ln1, self._eps), step))
            x.add_(self._mlp(layer, _rms_norm(x, layer.ln2, self._eps)))
        if every:  # speculative decoding verifies every position (padding skipped before the LM head)
            real = torch.arange(x.shape[1], device=self.device) < torch.tensor(lengths, device=self.device).unsqueeze(1)
            return self._lm_head(_rms_norm(x[real], self._norm, self._eps)).float()
        return self._last_logits(x, lengths)

    def _run_fused(self, kernels: cpu_kernels.CpuKernels, lo: int, padded: list[list[int]], starts: list[int],
                   lengths: list[int], every: bool) -> torch.Tensor:
        """:meth:`_run` for a few new tokens over cached context, in fused CPU kernels: per layer
        four kernel calls and the four matmuls. Each norm is fused with the residual add before it
        (the last with the model's final norm)."""
        positions = torch.tensor([[s + t for t in range(len(padded[0]))] for s in starts], dtype=torch.long)
        x = F.embedding(torch.tensor(padded, dtype=torch.long), self._embed)  # [n, steps, hidden], contiguous
        h = torch.empty_like(x)
        kernels.add_rms_norm(x, None, self._layers[0].ln1, h, self._eps)
        if self._body is not None and positions.numel() <= self._body.max_rows:  # every layer in one call
            kernels.int4_body(self._body, x, h, (self._cache.keys, self._cache.values), (self._cos, self._sin),
                              positions, lo, self._eps)
            return self._logits_of(h, lengths, every)
        norms = [layer.ln1 for layer in self._layers[1:]] + [self._norm]
        shape = (self._heads, self._kv_heads, self._head_dim)
        for index, (layer, next_norm) in enumerate(zip(self._layers, norms, strict=True)):
            keys, values = self._cache.keys[index], self._cache.values[index]
            q = kernels.rope_store(layer.qkv(h), self._cos, self._sin, positions, keys, values, shape, lo)
            attn = kernels.attend(q, keys, values, positions, self._kv_heads, lo)
            kernels.add_rms_norm(x, layer.o(attn), layer.ln2, h, self._eps)
            kernels.add_rms_norm(x, layer.down(kernels.silu_mul(layer.gate_up(h))), next_norm, h, self._eps)
        return self._logits_of(h, lengths, every)

    def _logits_of(self, h: torch.Tensor, lengths: list[int], every: bool) -> torch.Tensor:
        """The LM head over the final norm's output ``h`` [n, steps, hidden]: each row's last real
        token (``every``: every real token, row after row)."""
        if every:
            real = torch.arange(h.shape[1]) < torch.tensor(lengths).unsqueeze(1)
            return self._lm_head(h[real]).float()
        last = h[:, 0] if h.shape[1] == 1 else h[torch.arange(h.shape[0]), torch.tensor(lengths) - 1]
        return self._lm_head(last).float()

    def _step_inputs(self, lo: int, padded: list[list[int]], starts: list[int]) -> _StepInputs:
        """Tensors every layer of this forward shares: tokens, positions, rotary tables, mask, cache rows."""
        n, steps = len(padded), len(padded[0])
        device = self.device
        start = torch.tensor(starts, dtype=torch.long, device=device)
        positions = start.unsqueeze(1) + torch.arange(steps, device=device)  # [n, steps]
        rope_positions = positions.clamp(max=self._cos.shape[0] - 1)
        fresh = all(s == 0 for s in starts)  # a prefill from scratch attends only to its own tokens
        slots = torch.arange(lo, lo + n, device=device)
        kv_heads, capacity = self._kv_heads, self._cache.capacity
        value_rows = (
            (slots.view(n, 1, 1) * kv_heads + torch.arange(kv_heads, device=device).view(1, 1, kv_heads)) * capacity
            + positions.unsqueeze(2)
        ).reshape(-1)
        return _StepInputs(
            tokens=torch.tensor(padded, dtype=torch.long, device=device),
            lo=lo,
            positions=positions,
            cos=self._cos[rope_positions].unsqueeze(2),
            sin=self._sin[rope_positions].unsqueeze(2),
            bias=None if fresh else self._attention_bias(positions, capacity),
            key_slots=slots.unsqueeze(1),
            value_rows=value_rows,
            keys=None if fresh else self._cache.keys[:, lo : lo + n].flatten(1, 2),
            values=None if fresh else self._cache.values[:, lo : lo + n].flatten(1, 2),
        )

    def _attention(self, index: int, layer: LayerWeights, h: torch.Tensor, step: _StepInputs) -> torch.Tensor:
        """Self-attention of layer ``index`` on normed input ``h`` [n, steps, hidden], output projection
        included; writes the new keys and values into the cache."""
        n, steps = step.positions.shape
        heads, kv_heads, head_dim = self._heads, self._kv_heads, self._head_dim
        qk_width = (heads + kv_heads) * head_dim
        qkv = layer.qkv(h)
        qk = qkv[..., :qk_width].view(n, steps, heads + kv_heads, head_dim)
        # rotary on q and k together (sin sign-folded): 3 ops
        qk = torch.addcmul(qk * step.cos, qk.roll(head_dim // 2, dims=-1), step.sin)
        q = qk[:, :, :heads].transpose(1, 2)  # [n, heads, steps, head_dim]
        k = qk[:, :, heads:]  # [n, steps, kv_heads, head_dim]
        v = qkv[..., qk_width:].view(n, steps, kv_heads, head_dim)
        self._store(index, step, k, v)
        if step.bias is None:
            attn = F.scaled_dot_product_attention(
                q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            )
            attn = attn.transpose(1, 2).reshape(n, steps, heads * head_dim)
        else:
            assert step.keys is not None and step.values is not None
            attn = self._cached_attention(q, step.keys[index], step.values[index], step.bias)
        return layer.o(attn)

    def _store(self, index: int, step: _StepInputs, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the new keys and values [n, steps, kv_heads, head_dim] into layer ``index``'s cache."""
        head_dim = self._head_dim
        self._cache.keys[index][step.key_slots, :, :, step.positions] = k
        self._cache.values[index].view(-1, head_dim).index_copy_(0, step.value_rows, v.reshape(-1, head_dim))

    @staticmethod
    def _mlp(layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        gate, up = layer.gate_up(h).chunk(2, dim=-1)
        return layer.down(F.silu(gate) * up)

    def _last_logits(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """float32 logits of each row's last real (not padding) token."""
        if x.shape[1] == 1:
            last = x[:, 0]
        else:
            n = x.shape[0]
            last = x[torch.arange(n, device=self.device), torch.tensor(lengths, device=self.device) - 1]
        return self._lm_head(_rms_norm(last, self._norm, self._eps)).float()

    def prompt_logits(self, ids: list[int], chunk: int = 512) -> torch.Tensor:
        """Every position's logits, in chunks of ``chunk`` tokens, through a cache slot of its own."""
        handle = self.open()
        try:
            return torch.cat([self.forward([handle], [ids[i : i + chunk]], every=True)
                              for i in range(0, len(ids), chunk)])
        finally:
            self.release(handle)

    def _attention_bias(self, positions: torch.Tensor, key_len: int) -> torch.Tensor:
        """Additive float32 mask [n, 1, groups * steps, key_len]: query t of a row sees keys <= its position."""
        n, steps = positions.shape
        groups = self._heads // self._kv_heads
        visible = torch.arange(key_len, device=self.device) <= positions.unsqueeze(2)  # [n, steps, key_len]
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=self.device).masked_fill_(~visible, float("-inf"))
        return bias.unsqueeze(1).expand(n, groups, steps, key_len).reshape(n, 1, groups * steps, key_len)

    def _cached_attention(
        self, q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Attention of new queries [n, heads, steps, head_dim] over the cache, grouped-query style:
        ``keys_t`` [n * kv_heads, head_dim, capacity] and ``values`` [n * kv_heads, capacity,
        head_dim] are one layer's cache rows of the batch (contiguous views).

        Plain batched matmuls: for a handful of queries per sequence this is several times faster
        on CPU than ``scaled_dot_product_attention`` (whose flash kernel is tuned for long queries).
        """
        n, heads, steps, head_dim = q.shape
        kv_heads = self._kv_heads
        rows = n * kv_heads
        key_len = self._cache.capacity
        grouped = q.reshape(rows, (heads // kv_heads) * steps, head_dim)
        scores = torch.bmm(grouped, keys_t).view(n, kv_heads, -1, key_len)
        scores = torch.add(bias, scores, alpha=head_dim**-0.5)  # float32: the mask's dtype
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(rows, -1, key_len)
        out = torch.bmm(probs, values).view(n, heads, steps, head_dim)
        return out.transpose(1, 2).reshape(n, steps, heads * head_dim)
