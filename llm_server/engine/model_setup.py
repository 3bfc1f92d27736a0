"""What the engine reads from the loaded model: its runner, end-of-sequence ids, default top-k and context."""

from __future__ import annotations

import logging
from typing import Any

import torch

from llm_server.engine.generic_runner import GenericRunner
from llm_server.engine.hf_runner import HFRunner
from llm_server.engine.llama_runner import LlamaRunner, unsupported_reason
from llm_server.engine.runner import ModelRunner
from llm_server.engine.threads import may_reserve_io_core, reserve_io_core, step_timer

logger = logging.getLogger(__name__)


def eos_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    """End-of-sequence ids of the tokenizer and of the model's generation config."""
    ids: set[int] = set()
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    generation_config = getattr(model, "generation_config", None)
    candidates.append(getattr(generation_config, "eos_token_id", None))
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def default_top_k(model: Any, configured: int | None) -> int:
    """The top-k ``model.generate`` would use when sampling: the model's, else transformers' 50."""
    if configured is not None:
        return configured
    value = getattr(getattr(model, "generation_config", None), "top_k", None)
    return 50 if value is None else int(value)


def default_max_context(model: Any, budget: int) -> int:
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None) or budget
    return min(int(positions), budget)


#: Attribute a loader may set on the model to choose the runner: "auto" (default), "llama", "generic", "hf".
RUNNER_ATTR = "llm_server_runner"
RUNNER_CHOICES = ("auto", "llama", "generic", "hf")


def make_runner(model: Any, max_slots: int, max_context: int, pack_weights: bool = True) -> ModelRunner:
    """The fastest runner that supports ``model``; its ``reason`` says which and why (logged here).

    The compact Llama forward for the layouts it knows (faster on CPU, docs/engine.md), else the
    generic batched runner over the model's own modules, else the model's own forward, one sequence
    at a time (encoder-decoder, state-space layers, no attention-interface support). The model's
    :data:`RUNNER_ATTR` (when set) narrows the choice; a runner it names that cannot serve the model
    falls through to the next one, as in "auto".
    """
    choice = getattr(model, RUNNER_ATTR, "auto")
    if choice not in RUNNER_CHOICES:
        raise ValueError(f"unknown runner {choice!r}; use one of {', '.join(RUNNER_CHOICES)}")
    compact = unsupported_reason(model) if choice in ("auto", "llama") else f"runner {choice!r} was asked for"
    if compact is None:
        runner: ModelRunner = LlamaRunner(model, max_slots, max_context, pack_weights=pack_weights)
        runner.reason = f"compact batched Llama forward (model type {model.config.model_type!r})"
        logger.info("runner: LlamaRunner, %s", runner.reason)
        return runner
    try:
        if choice == "hf":
            raise ValueError("runner 'hf' was asked for")
        runner = GenericRunner(model, max_slots=max_slots, max_context=max_context, pack_weights=pack_weights)
    except Exception as exc:  # noqa: BLE001 - any failure to build the batched path leaves the slow one
        runner = HFRunner(model)
        runner.reason = f"one sequence at a time: {exc} (compact forward: {compact})"
        logger.warning("runner: HFRunner, the slow path, %s", runner.reason)
        return runner
    runner.reason = f"batched through transformers' attention interface (compact forward: {compact})"
    logger.info("runner: GenericRunner, %s", runner.reason)
    return runner


__all__ = ["RUNNER_ATTR", "RUNNER_CHOICES", "default_max_context", "default_top_k", "eos_ids", "make_runner", "warm_up"]


def warm_up(runner: ModelRunner, rows: int = 0, threads: int = 0) -> None:
    """One tiny forward so the first request does not pay for kernel initialisation; then, with
    ``rows`` and a thread count nobody chose (``threads``: the configured one, 0: none), decode steps
    of that many throwaway sequences timed for :func:`~llm_server.engine.threads.reserve_io_core`."""
    rows = rows if rows > 1 and may_reserve_io_core(threads) else 1
    with torch.inference_mode():
        handles = [runner.open() for _ in range(rows)]
        try:
            runner.forward(handles[:1], [[0, 0]])
            runner.forward(handles[:1], [[0]])
            if rows > 1:
                runner.forward(handles[1:], [[0, 0]] * (rows - 1))
                reserve_io_core(step_timer(lambda n: runner.forward(handles[:n], [[0]] * n)), rows, threads)
        finally:
            for handle in handles:
                runner.release(handle)
            runner.idle()
