"""Tiny random causal LMs of each model family, built from transformers' config classes (seeded, no download).

Shared by ``tests/test_generic_runner.py`` (correctness against ``model.generate``) and
``benchmarks/bench_models.py`` (throughput of the runners). Each has 2 layers, hidden size 64 and
weights drawn with ``initializer_range=0.2`` (so greedy output depends on the context); sliding
windows are a few tokens wide so a short prompt already crosses them.
"""

from __future__ import annotations

from typing import Any

import torch

WINDOW = 4  # sliding window of the windowed families: narrower than the test prompts

_SHAPE: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=1024, initializer_range=0.2,
)
_MOE: dict[str, Any] = dict(num_experts_per_tok=2)

#: family -> (config class, model class, extra config arguments)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, num_experts=4, moe_intermediate_size=32, decoder_sparse_step=1, **_MOE)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, **_MOE)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                    final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                    layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layers=[1, 0])),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(embedding_multiplier=2.0, attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=2.0)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(head_dim=16, sliding_window=WINDOW, num_local_experts=4, **_MOE)),
}


def available(family: str) -> str | None:
    """None when the installed transformers has ``family``; otherwise why not."""
    import transformers

    config_name, model_name, _ = FAMILIES[family]
    missing = [n for n in (config_name, model_name) if not hasattr(transformers, n)]
    if missing:
        return f"transformers {transformers.__version__} has no {', '.join(missing)}"
    return None


def build(family: str, vocab_size: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A tiny random ``family`` model in eval mode (``available(family)`` must be None)."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, **{**_SHAPE, **extra}
    )
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for module in model.modules():  # biases (Qwen2's q/k/v, GPT-OSS's) and sinks drawn too
            for name in ("bias", "sinks"):
                param = getattr(module, name, None)
                if isinstance(param, torch.nn.Parameter) and param.ndim == 1:
                    param.normal_(0.0, 0.2)
    return model.to(dtype).eval()


__all__ = ["FAMILIES", "WINDOW", "available", "build"]
