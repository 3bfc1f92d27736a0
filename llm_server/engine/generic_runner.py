"""GenericRunner: batched decode and prefill of any transformers causal LM, through its own modules.

The model's own forward runs (its norms, per-head q/k norms, rotary variants, soft-capping, MoE
blocks...) with ``config._attn_implementation`` switched, for the duration of the engine's forward,
to :mod:`.batched_attention`'s function: every attention layer then writes its keys and values
into the engine's :class:`~.kv_cache.SlotCache` and attends over it, batched over the sequences of
the step. The model's ``nn.Linear`` layers are replaced once by the engine's linears
(:func:`~.quant.replace_linears`: oneDNN-packed float, or weight-only int8 / int4).

:func:`generic_unsupported_reason` says why a model cannot run this way (encoder-decoder, no
attention-interface support, state-space or linear-attention layers, ...); at construction a probe
(a short prefill then one cached decode step, compared with the model's own forward) catches
architectures the checks miss, and :func:`~.model_setup.make_runner` then keeps ``HFRunner``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from llm_server.engine import batched_attention
from llm_server.engine.batched_attention import ATTENTION_NAME, CURRENT_STEP, StepContext
from llm_server.engine.hf_linears import body_linears, replace_linears, streamed_linears
from llm_server.engine.kv_cache import SlotCache
from llm_server.engine.llama_weights import release_memory
from llm_server.engine.quant import (
    ENGINE_OWNED_ATTR,
    HEAD_QUANTIZATION,
    QUANT_MODES,
    QUANTIZATION_ATTR,
    fast_rows,
    streamed_tensors,
)
from llm_server.engine.runner import KVHandle, ModelRunner, every_position_rows
from llm_server.engine.weight_arena import pack_streamed

ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
_PROBE_IDS = [3, 7, 1, 5, 2]


def generic_unsupported_reason(model: Any) -> str | None:
    """None when :class:`GenericRunner` can try ``model`` (the construction probe has the last word)."""
    config: Any = getattr(model, "config", None)
    if config is None:
        return "the model has no config"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not support transformers' attention interface"
    other = sorted(set(getattr(_text_config(config), "layer_types", None) or []) - ATTENTION_LAYER_TYPES)
    if other:
        return f"layers of type {', '.join(map(str, other))} keep state outside the attention cache"
    if any(name in type(model).__name__.lower() for name in ("mamba", "rwkv", "jamba", "zamba")):
        return "state-space layers keep state outside the attention cache"
    weights = list(model.parameters())
    devices = {p.device for p in weights}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return "weights spread over several devices (or offloaded)"
    if any(not p.dtype.is_floating_point for p in weights):
        return "weights of non-float dtypes (a quantized model?)"
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return "the model has no language-model head"
    return None


def _text_config(config: Any) -> Any:
    """The decoder's config (a multimodal model's text part; the config itself otherwise)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _kv_shape(config: Any) -> tuple[int, int]:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return kv_heads, head_dim


class GenericRunner(ModelRunner):
    """Batched forward of any decoder-only transformers model over an engine-owned KV cache.

    ``quantization``, ``free_model_weights`` and ``head_quantization`` as for ``LlamaRunner``.
    Raises ``ValueError`` when the model cannot run batched (:func:`generic_unsupported_reason`, or
    the probe disagreeing with the model's own forward).
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
    ) -> None:
        reason = generic_unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        self._model = model
        self._config = _text_config(model.config)
        # the configs whose attention implementation the forward switches (a multimodal model's and its text part's)
        self._configs = list({id(c): c for c in (model.config, self._config)}.values())
        self.device = next(model.parameters()).device
        self.dtype = model.get_output_embeddings().weight.dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.num_slots, self.max_context = max_slots, max_context
        self.quantization = quantization if quantization is not None else getattr(model, QUANTIZATION_ATTR, None)
        if self.quantization is not None and self.quantization not in QUANT_MODES:
            raise ValueError(f"unknown weight quantization {self.quantization!r}; use one of {QUANT_MODES}")
        if head_quantization == "default":
            head_quantization = HEAD_QUANTIZATION.get(self.quantization) if self.quantization else None
        free = bool(getattr(model, ENGINE_OWNED_ATTR, False)) if free_model_weights is None else free_model_weights
        self._layers = int(self._config.num_hidden_layers)
        kv_heads, head_dim = _kv_shape(self._config)
        self._cache = SlotCache(self._layers, kv_heads, head_dim, max_slots, max_context, self.dtype, self.device)
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        batched_attention.register()
        self._probe()  # before the linears change: compares with the model's own forward
        with torch.no_grad():
            self.weight_bytes = replace_linears(model, pack_weights, self.quantization, head_quantization, free)
        self.fast_tokens = fast_rows(body_linears(model))
        streamed = [t for linear in streamed_linears(model) for t in streamed_tensors(linear)]
        self._arena = pack_streamed(streamed) if self.device.type == "cpu" else None
        release_memory()

    # --- slots and cache ----------------------------------------------------------------
    def release(self, handle: KVHandle) -> None:
        self._cache.release(handle)

    def idle(self) -> None:
        self._cache.idle()

    @property
    def slot_cache(self) -> SlotCache:
        """The slot cache (so the engine's prefix cache can copy KV in and out of it)."""
        return self._cache

    @property
    def cache_shape(self) -> tuple[int, int]:
        """(slots, positions) the KV cache holds now."""
        return self._cache.rows, self._cache.capacity

    @property
    def cache_bytes(self) -> int:
        return self._cache.nbytes

    # --- forward ------------------------------------------------------------------------
    speculates = True  # forward(every=True) + rollback: speculative decoding (engine/speculative.py)

    def prompt_logits(self, ids: list[int]) -> torch.Tensor:
        """Every position's logits from the model's own forward (its own attention, no engine cache)."""
        with torch.no_grad():
            out = self._model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device), use_cache=False)
        return out.logits[0].float()

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
        inverse = [0] * len(order)
        for row, i in enumerate(order):
            inverse[i] = row
        return logits if order == sorted(order) else logits[inverse]

    def _run(self, lo: int, padded: list[list[int]], starts: list[int], lengths: list[int],
             every: bool = False) -> torch.Tensor:
        """The model's forward over a batch in slots ``lo..lo+n``: [n, vocab] float32 logits of each
        row's last real token (``every``: of each row's every real token, row after row)."""
        n, steps = len(padded), len(padded[0])
        device = self.device
        positions = torch.tensor(starts, device=device).unsqueeze(1) + torch.arange(steps, device=device)
        ctx = StepContext(
            cache=self._cache, lo=lo, positions=positions, fresh=all(s == 0 for s in starts),
            key_slots=torch.arange(lo, lo + n, device=device).unsqueeze(1),
        )
        last = torch.tensor(lengths, device=device) - 1
        kwargs: dict[str, Any] = {}
        if self._keep_arg:
            kwargs["logits_to_keep"] = 0 if every else 1 if steps == 1 else last.unsqueeze(1)
        logits = self._call_model(torch.tensor(padded, dtype=torch.long, device=device), positions, ctx, kwargs)
        if every:  # speculative decoding verifies every position (padding dropped)
            logits = logits[torch.arange(steps, device=device) < (last + 1).unsqueeze(1)]
        elif logits.shape[1] == steps and steps > 1:
            logits = logits[torch.arange(n, device=device), last]
        else:
            logits = logits[:, -1]
        if len(ctx.layers_seen) != self._layers:
            raise RuntimeError(
                f"the model's attention ran in {len(ctx.layers_seen)} of its {self._layers} layers "
                "through the engine's cache"
            )
        return logits.float()

    def _call_model(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        saved = [config._attn_implementation for config in self._configs]
        token = CURRENT_STEP.set(ctx)
        for config in self._configs:
            config._attn_implementation = ATTENTION_NAME
        try:
            with torch.no_grad():
                out = self._model(input_ids=input_ids, position_ids=positions, use_cache=False, **kwargs)
        finally:
            for config, name in zip(self._configs, saved, strict=True):
                config._attn_implementation = name
            CURRENT_STEP.reset(token)
        return out.logits

    # --- probe --------------------------------------------------------------------------
    def _probe(self) -> None:
        """Prefill a few tokens, decode one more from the cache, and compare both with the model's own
        forward: an architecture whose layers keep state elsewhere (or ignore the attention
        interface) disagrees, and is refused here rather than serving wrong text."""
        ids = [i % self.vocab_size for i in _PROBE_IDS]
        handle = self.open()
        try:
            with torch.no_grad():
                expected = self._model(input_ids=torch.tensor([ids], device=self.device), use_cache=False).logits[0]
            prefill = self.forward([handle], [ids[:-1]])[0]
            decode = self.forward([handle], [ids[-1:]])[0]
        except Exception as exc:  # any failure of the model's code under the batched attention
            raise ValueError(f"the batched forward failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.release(handle)
            self.idle()
        for got, want in ((prefill, expected[-2]), (decode, expected[-1])):
            want = want.float()
            if not torch.allclose(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()) + 1e-4):
                raise ValueError("the batched forward disagrees with the model's own forward")


__all__ = ["GenericRunner", "generic_unsupported_reason"]
