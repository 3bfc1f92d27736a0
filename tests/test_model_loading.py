"""Model loading: id resolution, optimisation choices, the GGUF cache, and initialize() on local folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_server.helper_functionality import model_loading
from llm_server.helper_functionality.model_loading import (
    EMBEDDED_MODEL_ID,
    ModelLoadError,
    apply_matmul_precision,
    export_embedded_model,
    initialize,
    load_tokenizer,
    resolve_attention,
    resolve_compile,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
    resolve_quantization,
)
from tests.conftest import build_tiny_llama, embedded_gguf

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """The tiny Llama and the embedded tokenizer saved as an ordinary Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- model ids


def test_model_ids_resolve_to_their_sources(tmp_path: Path) -> None:
    gguf = str(embedded_gguf())
    assert resolve_model_source(EMBEDDED_MODEL_ID) == model_loading.ModelSource("gguf", gguf)
    assert resolve_model_source(None).location == gguf
    assert resolve_model_source(gguf).kind == "gguf"
    assert resolve_model_source(tmp_path) == model_loading.ModelSource("folder", str(tmp_path.resolve()))
    assert resolve_model_source("meta-llama/Llama-3.1-8B-Instruct") == model_loading.ModelSource(
        "hub", "meta-llama/Llama-3.1-8B-Instruct"
    )


@pytest.mark.parametrize("bad", ["embedded:Other-1B", "/no/such/folder", "./missing", "missing.gguf"])
def test_unresolvable_model_ids_are_clear_errors(bad: str) -> None:
    with pytest.raises(ModelLoadError):
        resolve_model_source(bad)


# --------------------------------------------------------------------------- optimisation choices


def test_dtype_auto_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_loading, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(model_loading, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype(None, CPU) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", CUDA) == torch.bfloat16


def test_fast_bf16_detection_reads_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert model_loading.cpu_has_fast_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize(
    ("name", "dtype"), [("float32", torch.float32), ("bf16", torch.bfloat16), ("torch.float16", torch.float16)]
)
def test_dtype_can_be_forced(name: str, dtype: torch.dtype) -> None:
    assert resolve_dtype(name, CPU) == dtype


def test_unknown_dtype_is_an_error() -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8", CPU)


def test_attention_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_attention("auto", CPU) == "sdpa"
    assert resolve_attention("eager", CPU) == "eager"
    monkeypatch.setattr(model_loading, "flash_attention_available", lambda: True)
    assert resolve_attention("auto", CUDA) == "flash_attention_2"
    assert resolve_attention("auto", CPU) == "sdpa"
    monkeypatch.setattr(model_loading, "flash_attention_available", lambda: False)
    assert resolve_attention(None, CUDA) == "sdpa"
    with pytest.raises(ModelLoadError, match="flash_attention_2 needs CUDA"):
        resolve_attention("flash_attention_2", CPU)
    with pytest.raises(ModelLoadError, match="unknown attn_implementation"):
        resolve_attention("magic", CPU)


def test_compile_choice() -> None:
    assert resolve_compile(True, CPU) is True and resolve_compile(False, CUDA) is False
    assert resolve_compile("auto", CPU) is False and resolve_compile("auto", CUDA) is True
    assert resolve_compile(None, CUDA) is False
    with pytest.raises(ModelLoadError):
        resolve_compile("sometimes", CPU)


def test_quantization_choice() -> None:
    assert resolve_quantization(None, CPU, torch.float32) is None
    assert resolve_quantization("none", CPU, torch.float32) is None
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        resolve_quantization("4bit", CPU, torch.float32)
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        resolve_quantization("3bit", CPU, torch.float32)


def test_device_choice() -> None:
    assert resolve_device("cpu") == CPU
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == CPU
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_matmul_precision_is_applied() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        apply_matmul_precision("medium")
        assert torch.get_float32_matmul_precision() == "medium"
        with pytest.raises(ModelLoadError):
            apply_matmul_precision("extreme")
    finally:
        torch.set_float32_matmul_precision(before)


# --------------------------------------------------------------------------- initialize


def test_initialize_loads_a_local_folder_ready_for_inference(tiny_folder: Path) -> None:
    tok, model = initialize(device="cpu", model_id=str(tiny_folder), dtype="float32", compile=False)
    assert not model.training
    assert model.dtype == torch.float32 and model.device == CPU
    assert model.config._attn_implementation == "sdpa"
    assert tok.chat_template and model.generation_config.pad_token_id is not None
    reference = build_tiny_llama(len(tok))
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_initialize_takes_unset_options_from_model_config(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "model_config.yaml").write_text(
        "model:\n  optimizations:\n    dtype: bfloat16\n    attn_implementation: eager\n    compile: true\n"
        "    matmul_precision: highest\n"
    )
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    _, model = initialize(device="cpu", model_id=str(tiny_folder))
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert hasattr(model.forward, "_torchdynamo_orig_callable")  # wrapped by torch.compile
    assert torch.get_float32_matmul_precision() == "highest"
    _, plain = initialize(device="cpu", model_id=str(tiny_folder), dtype="float32", compile=False)
    assert plain.dtype == torch.float32 and not hasattr(plain.forward, "_torchdynamo_orig_callable")


@pytest.fixture(scope="module")
def gpt_oss_folder(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A tiny GPT-OSS (transformers has no SDPA path for it) saved with the embedded tokenizer."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import tiny_models

    if reason := tiny_models.available("gpt_oss"):
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("tiny-gpt-oss")
    tiny_models.build("gpt_oss", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_auto_attention_falls_back_to_eager_where_sdpa_is_refused(gpt_oss_folder: Path) -> None:
    _, model = initialize(device="cpu", model_id=str(gpt_oss_folder), dtype="float32", compile=False)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="attention implementation"):  # asked by name: no silent change
        initialize(
            device="cpu", model_id=str(gpt_oss_folder), dtype="float32", compile=False, attn_implementation="sdpa"
        )


def test_initialize_refuses_4bit_on_cpu(tiny_folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="CUDA"):
        initialize(device="cpu", model_id=str(tiny_folder), quantization="4bit")


# --------------------------------------------------------------------------- the embedded model's cache


def test_embedded_export_is_a_plain_hugging_face_folder(tokenizer: Any) -> None:
    folder = export_embedded_model()
    assert export_embedded_model() == folder  # cached: same folder, no second conversion
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert load_tokenizer(EMBEDDED_MODEL_ID) is tokenizer  # one tokenizer per model id and process


def test_cache_location_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_SERVER_CACHE_DIR", str(tmp_path))
    assert model_loading.cache_dir() == tmp_path
    assert model_loading._gguf_cache_folder(embedded_gguf()).parent == tmp_path / "models"
    monkeypatch.delenv("LLM_SERVER_CACHE_DIR")
    assert model_loading.cache_dir() == Path.home() / ".cache" / "llm_server"


@pytest.mark.integration
def test_cached_weights_equal_the_gguf_weights(embedded: tuple[Any, Any]) -> None:
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    _, cached = embedded
    direct_state = direct.state_dict()
    for name, tensor in cached.state_dict().items():
        assert torch.equal(tensor, direct_state[name]), name


def test_unavailable_hub_model_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        initialize(device="cpu", model_id="no-such-org/no-such-model", dtype="float32")
