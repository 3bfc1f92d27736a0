"""Server settings: ``server_config.yaml`` + ``azure_config.yaml`` + model defaults, resolved once.

``ServerSettings`` is the one object the HTTP layer reads (``app.state.settings``). It is
built from the YAML files by :func:`load_settings` (through ``helper_functionality.yaml_loading``,
which validates them and resolves the spec's environment placeholders such as
``CHAT_SERVER_API_KEY``) or directly in tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from llm_server.engine.types import SamplingParams
from llm_server.helper_functionality import yaml_loading
from llm_server.helper_functionality.yaml_loading import DEFAULT_HOST


def split_keys(raw: str | None) -> tuple[str, ...]:
    """``"k1, k2"`` -> ``("k1", "k2")``: several keys may be valid at once (rotation)."""
    if not raw:
        return ()
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class ServerSettings:
    """Everything the HTTP layer needs to know about its configuration."""

    host: str = DEFAULT_HOST
    port: int = 8000
    #: Keys from server_config.yaml / CHAT_SERVER_API_KEY (used when no Key Vault is configured).
    api_keys: tuple[str, ...] = ()
    allow_query_api_key: bool = True
    #: Explicit opt-out: serve without checking any API key.
    open_access: bool = False
    metrics_require_key: bool = False
    key_refresh_interval_s: float = 300.0
    shutdown_timeout_s: float = 30.0
    #: Upper bound on any request's max_new_tokens / max_tokens.
    max_new_tokens_limit: int = 1024
    max_body_bytes: int = 1_048_576
    #: server_config.yaml ``engine:`` section (EngineConfig keyword arguments).
    engine: Mapping[str, Any] = field(default_factory=dict)
    key_vault_url: str | None = None
    key_vault_secret_name: str | None = None
    #: model_config.yaml ``model:`` section (id, device, served_name, parameters, optimizations).
    model: Mapping[str, Any] = field(default_factory=dict)
    #: Role name -> system prompt (system_prompt_config.yaml).
    system_prompts: Mapping[str, str] = field(default_factory=lambda: {"assistant": "You are a helpful assistant."})
    #: Generation defaults for requests that do not say (model_config parameters, capped by the limit).
    default_params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if self.default_params.max_new_tokens > self.max_new_tokens_limit:
            capped = replace(self.default_params, max_new_tokens=self.max_new_tokens_limit)
            object.__setattr__(self, "default_params", capped)

    @property
    def uses_key_vault(self) -> bool:
        return bool(self.key_vault_url and self.key_vault_secret_name)

    @property
    def served_model_name(self) -> str:
        return str(self.model.get("served_name") or self.model.get("id") or "model")

    def with_overrides(self, **changes: Any) -> ServerSettings:
        """A copy with some fields changed (command-line flags, tests)."""
        return replace(self, **changes)


def default_sampling(parameters: Mapping[str, Any], max_new_tokens_limit: int) -> SamplingParams:
    """model_config ``parameters`` -> SamplingParams, with max_new_tokens capped by the server limit."""
    given = {key: value for key, value in parameters.items() if value is not None}
    base = SamplingParams()
    wanted = given.get("max_new_tokens", base.max_new_tokens)
    return SamplingParams(
        max_new_tokens=max(1, min(wanted, max_new_tokens_limit)),
        temperature=float(given.get("temperature", base.temperature)),
        top_p=float(given.get("top_p", base.top_p)),
        do_sample=given.get("do_sample", base.do_sample),
        repetition_penalty=float(given.get("repetition_penalty", base.repetition_penalty)),
    )


def engine_options(engine: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    """server_config ``engine:`` keys, plus model_config ``parameters.top_k`` as the engine's top_k.

    The batching engine applies one top_k to every sampled request; ``server.engine.top_k``
    wins when both are set.
    """
    options = dict(engine)
    if options.get("top_k") is None and parameters.get("top_k") is not None:
        options["top_k"] = parameters["top_k"]
    return options


def settings_from_config(
    server: Mapping[str, Any],
    azure: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    system_prompts: Mapping[str, str] | None = None,
) -> ServerSettings:
    """Build settings from the sections ``yaml_loading`` returns (validated, defaults filled in,
    placeholders resolved): ``load_chat_server_config()``, ``load_azure_config()``,
    ``load_model_config()`` and ``load_system_prompt()``."""
    azure = azure or {}
    model = model or {}
    parameters = model.get("parameters") or {}
    limit = server["limits"]["max_new_tokens"]
    return ServerSettings(
        host=server["host"],
        port=server["port"],
        api_keys=split_keys(server["api_key"]),
        allow_query_api_key=server["allow_query_api_key"],
        open_access=server["open_access"],
        metrics_require_key=server["metrics_require_key"],
        key_refresh_interval_s=float(server["key_refresh_interval_s"]),
        shutdown_timeout_s=float(server["shutdown_timeout_s"]),
        max_new_tokens_limit=limit,
        max_body_bytes=server["limits"]["max_body_bytes"],
        engine=engine_options(server["engine"], parameters),
        key_vault_url=azure.get("key_vault_url"),
        key_vault_secret_name=azure.get("api_key_secret_name"),
        model=dict(model),
        system_prompts=dict(system_prompts) if system_prompts else ServerSettings().system_prompts,
        default_params=default_sampling(parameters, limit),
    )


def load_settings() -> ServerSettings:
    """Read the four YAML files (from the configured folder) into ServerSettings."""
    return settings_from_config(
        yaml_loading.load_chat_server_config(),
        yaml_loading.load_azure_config(),
        yaml_loading.load_model_config(),
        yaml_loading.load_system_prompt(),
    )
