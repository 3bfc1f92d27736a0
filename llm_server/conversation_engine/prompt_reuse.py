"""Prompt reuse for the Python API's passes: a pass starts from the KV cache of the one before.

The server's engine has a prefix cache; ``model.generate`` has none of its own. The improvement
passes after a review open with the same messages (the reviser's prompt, the history, the
question and the answer under review: ``improvement_prompts.opening``), so :class:`PromptReuse`
keeps the ``past_key_values`` that ``model.generate`` returned for the last pass and lends the
next pass a copy cropped to the ids the two prompts share: transformers' documented recipe for
re-using a prompt cache. Only caches that can be cropped (``DynamicCache``) are reused; with any
other cache, or too little in common, a pass runs as it would without this.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import transformers

from llm_server.engine.prefix_cache import common_length

logger = logging.getLogger(__name__)

#: ``model.generate``'s keyword and output field for the KV cache (``past_key_values`` until
#: transformers 5, which renamed it ``cache`` and warns on the old name).
CACHE_FIELD = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"

#: Fewer shared prompt ids than this are prefilled again (not worth a copy of the cache).
MIN_SHARED_TOKENS = 16


class PromptReuse:
    """The last pass's prompt ids and KV cache; a cropped copy for the next pass that shares them."""

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._cache: Any = None

    def lend(self, ids: list[int]) -> Any | None:
        """A copy of the kept cache holding the first ids ``ids`` shares with the last prompt (its
        last id is always run again: it gives the first new token's logits); None: nothing to lend."""
        shared = min(common_length(self._ids, ids), len(ids) - 1)
        if self._cache is None or shared < MIN_SHARED_TOKENS:
            return None
        try:
            cache = copy.deepcopy(self._cache)
            cache.crop(shared - cache.get_seq_length())  # a negative count: the ids to drop from the end
        except (AttributeError, NotImplementedError, TypeError, ValueError, RuntimeError) as exc:
            logger.debug("prompt cache not reused: %s", exc)
            return None
        return cache

    def keep(self, ids: list[int], output: Any) -> None:
        """After a pass: its prompt ``ids`` and the cache in ``model.generate``'s ``output`` (the
        prompt's KV, then the new tokens'); a cache that cannot be cropped is not kept."""
        cache = output.get(CACHE_FIELD) if hasattr(output, "get") else None
        if cache is None or not callable(getattr(cache, "crop", None)):
            self._ids, self._cache = [], None
            return
        self._ids, self._cache = list(ids), cache


__all__ = ["CACHE_FIELD", "MIN_SHARED_TOKENS", "PromptReuse"]
