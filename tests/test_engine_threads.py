"""One thread runs every torch op of the engine's model: load, runner build, warm-up and steps.

Each thread that runs torch ops gets its own OpenMP team; a second team (the model loaded on one
thread, stepped on another) halved the step's speed on a 2-core machine (issue 9). The check
records, for every thread, whether it called into torch (a ``torch*`` builtin or a tensor
method) while the engine was loaded and served requests. The second test shows the check does
fail on the old arrangement (model loaded on the caller's thread, stepped on the engine's).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.engine.types import GenerationRequest, SamplingParams
from tests.conftest import build_tiny_llama


@contextmanager
def threads_calling_torch() -> Iterator[set[str]]:
    """The names of the threads that call into torch inside the block (threads started in it too)."""
    names: set[str] = set()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "c_call":
            return
        try:
            module = str(getattr(arg, "__module__", None) or "")
            owner = getattr(arg, "__self__", None)
        except Exception:  # noqa: BLE001 - a profiler must never break the code it watches
            return
        if module.startswith("torch") or isinstance(owner, torch.Tensor):
            names.add(threading.current_thread().name)

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        yield names
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]


def serve_two_requests(engine: BatchEngine, tokenizer: Any) -> None:
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3, repetition_penalty=1.2)
        streams = [engine.submit(GenerationRequest(f"t{i}", list(tokenizer("Hello there")["input_ids"]), params))
                   for i in range(2)]
        assert all(s.result().completion_tokens > 0 for s in streams)
    finally:
        engine.shutdown(timeout_s=30)


def test_only_the_engine_thread_runs_torch_ops_of_the_model(tokenizer: Any) -> None:
    loaded_on: list[str] = []

    def load() -> tuple[Any, Any]:
        loaded_on.append(threading.current_thread().name)
        return tokenizer, build_tiny_llama(len(tokenizer))

    with threads_calling_torch() as names:
        engine = BatchEngine.from_loader(load, "tiny", EngineConfig(max_running=4))
        serve_two_requests(engine, tokenizer)
    assert loaded_on == ["batch-engine"]
    assert names == {"batch-engine"}


def test_the_check_catches_a_model_loaded_on_another_thread(tokenizer: Any) -> None:
    with threads_calling_torch() as names:
        model = build_tiny_llama(len(tokenizer))  # loaded here, stepped on the engine's thread
        serve_two_requests(BatchEngine(tokenizer, model, "tiny", EngineConfig(max_running=4)), tokenizer)
    assert names == {threading.current_thread().name, "batch-engine"}


def test_a_load_failure_is_raised_by_start() -> None:
    def load() -> tuple[Any, Any]:
        raise OSError("no such model")

    engine = BatchEngine.from_loader(load, "missing")
    try:
        engine.start()
    except OSError as exc:
        assert "no such model" in str(exc)
    else:
        raise AssertionError("start() returned although the model failed to load")
    assert not engine.stats().ready and not engine.stats().healthy
    engine.shutdown(0)
