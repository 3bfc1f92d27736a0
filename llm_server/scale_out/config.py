"""The ``scale_out:`` section of ``server_config.yaml``: how many replicas, and what each one gets.

One small pydantic model, :class:`ScaleOutConfig`, read from the ``scale_out`` key of
``server_config.yaml`` by :func:`load_scale_out_config` (absent section: the defaults). It
only matters when the server runs on Ray Serve (``start_llm_server --replicas N``,
``--ray-address``, or ``serve run llm_server.scale_out.serve_app:app``).

Serve's own defaults starve a continuous-batching engine, so they are set here on purpose:

- ``max_ongoing_requests`` (Serve's default: 5) caps the requests a replica holds at once.
  A batching engine wants many at once; the default here lets a replica take as many as its
  engine runs plus queues (``server.engine.max_running + max_waiting``), so the engine's own
  503 "overloaded" stays the back-pressure point, as without Serve.
- ``omp_threads`` (OpenMP / torch threads per replica) defaults to ``num_cpus``: a replica that
  asks for 1 CPU decodes on 1 thread, instead of every replica spinning one thread per core.
- ``prefix_affinity`` (default on) replaces Serve's router with
  :class:`~.affinity_router.PrefixAffinityRouter`: a conversation's turns reach the replica that
  holds its prefix unless it holds ``affinity_max_imbalance`` (default: the engine's
  ``max_running``) more requests than the next choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llm_server.engine.config import EngineConfig
from llm_server.helper_functionality import yaml_loading
from llm_server.helper_functionality.yaml_loading import SERVER_CONFIG_FILE, ConfigError

#: Serve's default for max_ongoing_requests (too few for a batching engine; documented, not used).
SERVE_DEFAULT_MAX_ONGOING = 5


class Autoscaling(BaseModel):
    """Serve autoscaling: between ``min_replicas`` and ``max_replicas`` replicas, aiming at
    ``target_ongoing_requests`` requests in flight per replica."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ScaleOutConfig(BaseModel):
    """Replicas and per-replica resources of the Serve deployment (defaults documented inline)."""

    model_config = ConfigDict(extra="forbid")

    #: Fixed number of replicas (ignored when ``autoscaling`` is set).
    replicas: int = Field(1, ge=1)
    #: Autoscaling instead of a fixed count (null: fixed ``replicas``).
    autoscaling: Autoscaling | None = None
    #: CPUs Ray reserves for each replica (the OpenMP thread count follows it by default).
    num_cpus: float = Field(1.0, gt=0)
    #: GPUs per replica (0: CPU; 1: one whole GPU each; 0.5: two replicas share one).
    num_gpus: float = Field(0.0, ge=0)
    #: Requests one replica holds at once (null: engine max_running + max_waiting).
    max_ongoing_requests: int | None = Field(None, ge=1)
    #: OpenMP / torch threads per replica (null: num_cpus rounded, at least 1).
    omp_threads: int | None = Field(None, ge=1)
    #: Name of the Serve application and its route prefix.
    app_name: str = "llm_server"
    route_prefix: str = "/"
    #: Seconds Serve waits for a replica's health check (a model step can be slow).
    health_check_timeout_s: float = Field(30.0, gt=0)
    #: Route a conversation's turns (``x-session-id``, else a hash of its opening) to one replica.
    prefix_affinity: bool = True
    #: In-flight requests the preferred replica may hold above the next choice (null: engine max_running).
    affinity_max_imbalance: int | None = Field(None, ge=0)

    def ongoing_requests(self, engine: EngineConfig) -> int:
        """``max_ongoing_requests``, else the engine's running + waiting capacity."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return engine.max_running + engine.max_waiting

    def max_imbalance(self, engine: EngineConfig) -> int:
        """``affinity_max_imbalance``, else one full batch of the engine (``max_running``)."""
        return self.affinity_max_imbalance if self.affinity_max_imbalance is not None else engine.max_running

    def threads(self) -> int:
        """OpenMP threads a replica uses."""
        return self.omp_threads if self.omp_threads is not None else max(1, round(self.num_cpus))

    def with_replicas(self, replicas: int | None) -> ScaleOutConfig:
        """A copy with a fixed replica count (``--replicas``); None keeps this one."""
        if replicas is None:
            return self
        return self.model_copy(update={"replicas": replicas, "autoscaling": None})


def scale_out_from_mapping(section: Mapping[str, Any] | None, file: str = SERVER_CONFIG_FILE) -> ScaleOutConfig:
    """Validate a ``scale_out`` mapping; problems raise :class:`ConfigError` naming the key."""
    if section is None:
        return ScaleOutConfig()
    if not isinstance(section, Mapping):
        raise ConfigError(file, "scale_out", f"expected a mapping, got {type(section).__name__}")
    try:
        return ScaleOutConfig.model_validate(dict(section))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in ("scale_out", *first["loc"]))
        raise ConfigError(file, where, first["msg"]) from None


def load_scale_out_config() -> ScaleOutConfig:
    """The ``scale_out`` section of the config folder's server_config.yaml (defaults if absent)."""
    path = yaml_loading.resolve_config_path(SERVER_CONFIG_FILE, search_cwd=False)
    return scale_out_from_mapping(yaml_loading.load_yaml(path).get("scale_out"), str(path))
