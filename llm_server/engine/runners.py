"""Model runners: run one forward step for a batch of sequences, each with its own KV cache.

The scheduler talks to a :class:`ModelRunner`: ``open`` a cache handle per request,
``forward`` new tokens of several sequences at once (getting the next-token logits of each),
``release`` the handle when the request leaves. :func:`make_runner` picks the compact batched
runner for Llama-family models and falls back to :class:`HFRunner` (the model's own forward,
one sequence at a time) for any other causal LM.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class KVHandle:
    """One sequence's place in a runner's KV cache."""

    length: int = 0  # tokens already in the cache
    slot: int = -1  # batched runner: row of the cache tensors
    state: Any = None  # fallback runner: the model's own cache object


class ModelRunner(ABC):
    """Runs the model for a batch of sequences; owns their KV caches."""

    device: torch.device
    vocab_size: int

    def open(self) -> KVHandle:
        """A new, empty cache for one sequence."""
        return KVHandle()

    @abstractmethod
    def forward(self, handles: Sequence[KVHandle], tokens: Sequence[list[int]]) -> torch.Tensor:
        """Append ``tokens[i]`` to sequence ``handles[i]``; return [n, vocab] float32 logits of
        each sequence's last new token."""

    @abstractmethod
    def release(self, handle: KVHandle) -> None:
        """Free a sequence's cache (idempotent)."""

    def idle(self) -> None:
        """Called when no sequence is running (a chance to give memory back)."""


class HFRunner(ModelRunner):
    """Fallback for any causal LM: the model's own forward and cache, one sequence at a time."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name still works, deprecated)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, handles: Sequence[KVHandle], tokens: Sequence[list[int]]) -> torch.Tensor:
        rows = []
        for handle, ids in zip(handles, tokens):
            input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
            out = self._model(input_ids=input_ids, use_cache=True, **{self._cache_arg: handle.state})
            handle.state = out[self._cache_arg] if self._cache_arg in out else out.past_key_values
            handle.length += len(ids)
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    def release(self, handle: KVHandle) -> None:
        handle.state = None


def make_runner(model: Any, max_slots: int, max_context: int, pack_weights: bool = True) -> ModelRunner:
    """The fastest runner that supports ``model``."""
    from llm_server.engine.llama_runner import LlamaRunner, unsupported_reason

    reason = unsupported_reason(model)
    if reason is None:
        return LlamaRunner(model, max_slots=max_slots, max_context=max_context, pack_weights=pack_weights)
    logger.warning("using the slow one-sequence-at-a-time path: %s", reason)
    return HFRunner(model)
