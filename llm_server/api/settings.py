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

from llm_server.engine.config import EngineConfig
from llm_server.engine.types import SamplingParams
from llm_server.helper_functionality import yaml_loading
from llm_server.helper_functionality.config_models import ModelParameters, ModelSection, ServerSection
from llm_server.helper_functionality.yaml_loading import DEFAULT_HOST


def split_keys(raw: str | None) -> tuple[str, ...]:
    """``"k1, k2"`` -> ``("k1", "k2")``: several keys may be valid at once (rotation)."""
    if not raw:
        return ()
    return tuple(part.strip() for part in raw.split(",") if part.strip())


#: The defaults of every server setting, declared once in the config models.
_DEFAULT = ServerSection()


@dataclass(frozen=True)
class ServerSettings:
    """Everything the HTTP layer needs to know about its configuration."""

    host: str = DEFAULT_HOST
    port: int = _DEFAULT.port
    #: Keys from server_config.yaml / CHAT_SERVER_API_KEY (used when no Key Vault is configured).
    api_keys: tuple[str, ...] = ()
    allow_query_api_key: bool = _DEFAULT.allow_query_api_key
    #: Explicit opt-out: serve without checking any API key.
    open_access: bool = _DEFAULT.open_access
    metrics_require_key: bool = _DEFAULT.metrics_require_key
    key_refresh_interval_s: float = _DEFAULT.key_refresh_interval_s
    shutdown_timeout_s: float = _DEFAULT.shutdown_timeout_s
    #: Upper bound on any request's max_new_tokens / max_tokens.
    max_new_tokens_limit: int = _DEFAULT.limits.max_new_tokens
    max_body_bytes: int = _DEFAULT.limits.max_body_bytes
    request_head_timeout_s: float = _DEFAULT.limits.request_head_timeout_s
    request_body_timeout_s: float = _DEFAULT.limits.request_body_timeout_s
    log_format: str = _DEFAULT.log_format
    #: server_config.yaml ``engine:`` section (model_config's ``parameters.top_k`` folded in).
    engine: EngineConfig = field(default_factory=EngineConfig)
    key_vault_url: str | None = None
    key_vault_secret_name: str | None = None
    #: model_config.yaml ``model:`` section (id, device, served_name, parameters, optimizations).
    model: ModelSection = field(default_factory=ModelSection)
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
        return self.model.display_name

    def with_overrides(self, **changes: Any) -> ServerSettings:
        """A copy with some fields changed (command-line flags, tests)."""
        return replace(self, **changes)


def default_sampling(parameters: ModelParameters, max_new_tokens_limit: int) -> SamplingParams:
    """model_config ``parameters`` -> SamplingParams, with max_new_tokens capped by the server limit."""
    base = SamplingParams()
    wanted = parameters.max_new_tokens if parameters.max_new_tokens is not None else base.max_new_tokens
    return replace(
        base,
        max_new_tokens=max(1, min(wanted, max_new_tokens_limit)),
        temperature=_given(parameters.temperature, base.temperature),
        top_p=_given(parameters.top_p, base.top_p),
        do_sample=_given(parameters.do_sample, base.do_sample),
        repetition_penalty=_given(parameters.repetition_penalty, base.repetition_penalty),
    )


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def engine_options(engine: EngineConfig, parameters: ModelParameters) -> EngineConfig:
    """server_config ``engine:``, with model_config ``parameters.top_k`` as the engine's top_k.

    The batching engine applies one top_k to every sampled request; ``server.engine.top_k``
    wins when both are set.
    """
    if engine.top_k is None and parameters.top_k is not None:
        return engine.model_copy(update={"top_k": parameters.top_k})
    return engine


def settings_from_config(
    server: Mapping[str, Any],
    azure: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | ModelSection | None = None,
    system_prompts: Mapping[str, str] | None = None,
) -> ServerSettings:
    """Build settings from the sections ``yaml_loading`` returns (validated, defaults filled in,
    placeholders resolved): ``load_chat_server_config()``, ``load_azure_config()``,
    ``load_model_config()`` (or ``read_model_section()``) and ``load_system_prompt()``."""
    azure = azure or {}
    section = model if isinstance(model, ModelSection) else ModelSection.model_validate(model or {})
    engine = server["engine"]
    engine = engine if isinstance(engine, EngineConfig) else EngineConfig.model_validate(engine)
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
        request_head_timeout_s=float(server["limits"].get("request_head_timeout_s", 30)),
        request_body_timeout_s=float(server["limits"].get("request_body_timeout_s", 30)),
        log_format=server.get("log_format", "text"),
        engine=engine_options(engine, section.parameters),
        key_vault_url=azure.get("key_vault_url"),
        key_vault_secret_name=azure.get("api_key_secret_name"),
        model=section,
        system_prompts=dict(system_prompts) if system_prompts else ServerSettings().system_prompts,
        default_params=default_sampling(section.parameters, limit),
    )


def load_settings() -> ServerSettings:
    """Read the four YAML files (from the configured folder) into ServerSettings."""
    return settings_from_config(
        yaml_loading.load_chat_server_config(),
        yaml_loading.load_azure_config(),
        yaml_loading.read_model_section(),
        yaml_loading.load_system_prompt(),
    )
