"""The model-runner interface: run one forward step for a batch of sequences, each with its own KV cache.

The scheduler talks to a :class:`ModelRunner`: ``open`` a cache handle per request,
``forward`` new tokens of several sequences at once (getting the next-token logits of each),
``release`` the handle when the request leaves. Implementations: :class:`~.llama_runner.LlamaRunner`
(compact batched forward for Llama-family models), :class:`~.generic_runner.GenericRunner` (any
decoder-only transformers model, batched through its own modules) and :class:`~.hf_runner.HFRunner`
(any causal LM, one sequence at a time); ``model_setup.make_runner`` picks one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from llm_server.engine.kv_cache import KVHandle as KVHandle  # re-exported: the runners' handle type
from llm_server.engine.kv_cache import SlotCache


class ModelRunner(ABC):
    """Runs the model for a batch of sequences; owns their KV caches."""

    device: torch.device
    vocab_size: int
    reason: str = ""  # which runner serves the model and why (``model_setup.make_runner`` sets it)
    #: ``forward(..., every=True)`` and :meth:`rollback` work: speculative decoding (engine/speculative.py)
    speculates: bool = False
    #: The most new tokens of a step whose linears still read the quantized copy (``quantization:
    #: auto``: :func:`~.quant.fast_rows`); speculation keeps a step of fewer rows within it. None: no such bound.
    fast_tokens: int | None = None

    def open(self) -> KVHandle:
        """A new, empty cache for one sequence."""
        return KVHandle()

    @abstractmethod
    def forward(self, handles: Sequence[KVHandle], tokens: Sequence[list[int]], every: bool = False) -> torch.Tensor:
        """Append ``tokens[i]`` to sequence ``handles[i]``; return [n, vocab] float32 logits of
        each sequence's last new token (``every``, runners that ``speculates``: the logits of every
        new token, [sum of the rows' lengths, vocab], row after row in the order of ``handles``)."""

    @abstractmethod
    def release(self, handle: KVHandle) -> None:
        """Free a sequence's cache (idempotent)."""

    def rollback(self, handle: KVHandle, length: int) -> None:
        """Forget ``handle``'s cached positions from ``length`` on (rejected draft tokens). In a slot
        cache a position at or beyond ``length`` is masked from every query and overwritten by the
        next forward, so only the length changes (runners that ``speculates``)."""
        if not self.speculates:
            raise NotImplementedError(f"{type(self).__name__} does not speculate")
        handle.length = min(handle.length, length)

    def prompt_logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] float32 logits at every position of ``ids`` read as one new sequence (the
        prompt's log-probabilities); no other sequence's cache is touched. This default feeds the ids
        one at a time through :meth:`forward` on a cache of its own; runners override it with one pass."""
        handle = self.open()
        try:
            return torch.cat([self.forward([handle], [[token]]) for token in ids])
        finally:
            self.release(handle)

    @property
    def slot_cache(self) -> SlotCache | None:
        """The runner's :class:`~.kv_cache.SlotCache` when it keeps its KV there (the engine's prefix
        cache then copies prefixes in and out of it); None: no prefix caching (0 cached tokens)."""
        return None

    def idle(self) -> None:  # noqa: B027 - an optional hook: the default does nothing
        """Called when no sequence is running (a chance to give memory back)."""


def every_position_rows(order: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """Rows of logits computed row after row in slot ``order`` (``order[r]``: the caller's index of
    slot row ``r``, ``lengths[r]`` its tokens) that put them back in the caller's order."""
    starts = [0] * len(order)
    for r in range(1, len(order)):
        starts[r] = starts[r - 1] + lengths[r - 1]
    row_of = {caller: r for r, caller in enumerate(order)}
    return [starts[row_of[i]] + j for i in range(len(order)) for j in range(lengths[row_of[i]])]
