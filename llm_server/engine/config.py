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
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
        "in this process's affinity mask"
    )


__all__ = ["EngineConfig"]
