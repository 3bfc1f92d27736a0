"""HFRunner: the fallback runner for any causal LM (the model's own forward and cache, one sequence at a time)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from llm_server.engine.runner import KVHandle, ModelRunner


class HFRunner(ModelRunner):
    """Fallback for any causal LM: the model's own forward and cache, one sequence at a time."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name still works, deprecated)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, handles: Sequence[KVHandle], tokens: Sequence[list[int]], every: bool = False) -> torch.Tensor:
        if every:  # the model's own cache cannot be rolled back: no speculative decoding
            raise NotImplementedError("HFRunner does not speculate")
        rows = []
        for handle, ids in zip(handles, tokens, strict=True):
            input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
            out = self._model(input_ids=input_ids, use_cache=True, **{self._cache_arg: handle.state})
            handle.state = out[self._cache_arg] if self._cache_arg in out else out.past_key_values
            handle.length += len(ids)
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    def release(self, handle: KVHandle) -> None:
        handle.state = None

    def prompt_logits(self, ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self._model(input_ids=input_ids, use_cache=False).logits[0].float()
