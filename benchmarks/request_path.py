"""Which library files one request passes through, route to forward and back (docs/architecture.md).

Runs the real app on a tiny random Llama in a real uvicorn on loopback, records every
``llm_server`` file whose code runs (any thread) while one streamed ``/v1/chat/completions``
request (or ``/chat/stream``) is served, and prints them in first-seen order.

    .venv/bin/python benchmarks/request_path.py [--spec]
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

seen: dict[str, None] = {}
recording = threading.Event()


def _profile(frame: Any, event: str, arg: Any) -> None:
    if recording.is_set() and event == "call":
        name = frame.f_code.co_filename
        if "/llm_server/" in name and name not in seen:
            seen[name] = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", action="store_true", help="trace GET /chat/stream instead")
    args = parser.parse_args()
    threading.setprofile(_profile)
    sys.setprofile(_profile)
    import httpx
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_server.engine.batch_engine import BatchEngine, EngineConfig
    from llm_server.helper_functionality.model_loading import load_tokenizer
    from tests.openai_harness import API_KEY, build_app, live_server

    torch.manual_seed(0)
    tokenizer = load_tokenizer("embedded:SmolLM2-135M-Instruct")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    engine = BatchEngine(tokenizer, LlamaForCausalLM(config).eval(), "tiny", EngineConfig(max_running=2))
    with live_server(build_app(engine)) as url:  # type: ignore[arg-type]
        headers = {"X-API-Key": API_KEY}
        recording.set()
        if args.spec:
            httpx.get(f"{url}/chat/stream", params={"prompt": "Hi", "max_new_tokens": 4}, headers=headers)
        else:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                    "stream": True}
            httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        recording.clear()
    files = [str(Path(name).relative_to(ROOT / "llm_server")) for name in seen]
    for name in files:
        print(name)
    print(f"{len(files)} library files")


if __name__ == "__main__":
    main()
