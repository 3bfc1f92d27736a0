"""Image build step: convert the embedded model once, so the container starts without converting.

Runs in the Containerfile's build stage with ``LLM_SERVER_CACHE_DIR`` set. It calls the server's own
``export_embedded_model()`` (the GGUF de-quantized into a Hugging Face folder in the cache, exactly
where the server looks at start), then stores that folder's weights in bfloat16 instead of float32.

Why the cache stays valid in the image: its key is the GGUF's path, size, mtime (in nanoseconds)
and the transformers version. The path and size do not change between the stages, but an image
layer's tar may keep only whole seconds of an mtime, so the GGUF's mtime is first set to a whole
second; then the runtime image sees exactly the mtime the key was made from.

Why bfloat16 is safe: the server loads the folder with ``dtype`` from model_config.yaml ("auto"),
and ``from_pretrained`` casts what it reads to that dtype. Served in bfloat16 (GPUs, CPUs with
AVX-512 BF16 / AMX) the weights are bit for bit what a float32 cache gives after its cast; served in
float32 (other CPUs) each weight is the float32 value rounded to bfloat16 (8 bits of mantissa).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llm_server.helper_functionality.model_loading import embedded_gguf_path, export_embedded_model


def whole_second_mtime(path: Path) -> None:
    """Truncate the file's mtime to whole seconds (what every layer tar format keeps)."""
    stat = path.stat()
    seconds = stat.st_mtime_ns // 1_000_000_000
    os.utime(path, ns=(seconds * 1_000_000_000, seconds * 1_000_000_000))


def to_bfloat16(folder: Path) -> None:
    """Re-save the folder's float weights as bfloat16 safetensors (the tokenizer files stay)."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    model.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16", config


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    started = time.perf_counter()
    gguf = embedded_gguf_path()
    whole_second_mtime(gguf)
    folder = export_embedded_model()
    fp32_mb = folder_mb(folder)
    to_bfloat16(folder)
    print(f"converted {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) into {folder}: "
          f"{fp32_mb:.0f} MB as float32, {folder_mb(folder):.0f} MB as bfloat16, "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    if export_embedded_model() != folder:
        raise SystemExit("the cache key changed after the conversion: the server would convert again")


if __name__ == "__main__":
    main()
