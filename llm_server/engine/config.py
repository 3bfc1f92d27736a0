"""EngineConfig: the batching engine's settings, the single source of their defaults and bounds.

It is also the schema of ``server_config.yaml``'s ``server.engine`` section: the YAML loader
validates that section with this model (unknown keys, wrong types and out-of-range values are
errors naming the key), so a default written here is the default everywhere.

Prefix caching (``prefix_caching``, on by default): the KV of a finished or running request's
full 16-token blocks is kept, and a later request whose prompt starts with the same tokens copies
it into its slot and prefills only the rest (:mod:`.prefix_cache`). The cached tokens count
against ``max_total_tokens`` together with the running requests' reservations; the cache holds at
most ``prefix_cache_tokens`` (default half the budget) and gives way, least recently used first,
whenever an admission needs the room.

Step token budget (``step_token_budget``, vLLM's ``max_num_batched_tokens``): while sequences are
decoding, a step's prefill forward gets at most ``step_token_budget - decoding`` prompt tokens
(padding included, and never more than ``prefill_chunk_tokens``), so one step's work, decode rows
plus prompt chunk, stays within the budget and running streams keep a steady inter-token latency
while a long prompt is admitted in chunks. With nothing decoding, there is no stream to protect and
a prefill forward takes up to ``prefill_chunk_tokens``. 0 turns the budget off (one prefill group of
up to ``prefill_chunk_tokens`` per step whatever is decoding). See docs/engine.md.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineConfig(BaseModel):
    """Scheduler limits and engine options; every field is a ``server.engine`` key."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    max_running: int = Field(64, ge=1, description="sequences decoded together")
    max_waiting: int = Field(
        1024, ge=1, description="hard cap on queued requests (memory); admission is by max_queue_wait_s"
    )
    max_queue_wait_s: float = Field(
        30, gt=0, description="queue a request only if it is expected to start within this; else 503 + Retry-After"
    )
    max_total_tokens: int = Field(32768, ge=1, description="KV-cache budget in tokens across running sequences")
    max_context: int | None = Field(
        None, ge=1, description="per-sequence prompt + new tokens; default: the model's window capped by the budget"
    )
    prefill_chunk_tokens: int = Field(
        1024, ge=1, description="most prompt tokens (padding included) in one prefill forward"
    )
    step_token_budget: int = Field(
        256, ge=0, description="most tokens of one step while sequences decode: decode rows + the prompt chunk "
        "prefilled beside them (a long prompt is admitted in chunks); 0 = off; must exceed max_running"
    )
    retry_after_s: int = Field(1, ge=1, description="seconds suggested in the Retry-After header of a 503")
    seed: int | None = Field(None, ge=0, description="seed of the shared generator for unseeded sampled requests")
    top_k: int | None = Field(
        None, ge=0, description="sampled requests: default the model's generation_config.top_k, else 50; 0 = off"
    )
    pack_weights: bool = Field(True, description="CPU: run linears on oneDNN pre-packed weights (faster)")
    prefix_caching: bool = Field(
        True, description="reuse the KV of earlier requests' shared prompt prefixes (chat history, system prompts)"
    )
    prefix_cache_tokens: int | None = Field(
        None, ge=0, description="most tokens the prefix cache keeps, within max_total_tokens (running requests "
        "evict it); default: half of max_total_tokens"
    )
    speculative_tokens: int = Field(
        8, ge=0, le=32, description="speculative decoding: most draft tokens verified per step, drafted from a "
        "request's prediction and its context (n-gram lookup); 0 = off"
    )
    speculative_lookup: bool = Field(
        False, description="speculative decoding for every request, drafted from its prompt and output alone "
        "(prompt lookup); false: only requests with a prediction speculate"
    )
    threads: int = Field(
        0, ge=0, description="torch threads of the engine thread; 0 = OMP_NUM_THREADS if set, else the cores "
        "in this process's affinity mask, one fewer when the model's decode steps are so short that streaming "
        "their tokens needs most of a core (engine/threads.py)"
    )

    @model_validator(mode="after")
    def _budget_leaves_room_to_prefill(self) -> EngineConfig:
        if 0 < self.step_token_budget <= self.max_running:
            raise ValueError(
                f"step_token_budget ({self.step_token_budget}) must exceed max_running ({self.max_running}): "
                "a full batch's decode rows alone would fill every step and leave no token to prefill a new "
                "prompt; raise it, lower max_running, or set step_token_budget: 0 to turn the budget off"
            )
        return self

    def prefill_tokens_beside(self, decoding: int) -> int:
        """Most prompt tokens (padding included) of a prefill forward run in a step where ``decoding``
        sequences decode: ``prefill_chunk_tokens``, bounded by what the step token budget leaves."""
        if not self.step_token_budget or not decoding:
            return self.prefill_chunk_tokens
        return max(1, min(self.prefill_chunk_tokens, self.step_token_budget - decoding))


__all__ = ["EngineConfig"]
