"""Server settings: ``server_config.yaml`` + ``azure_config.yaml`` + model defaults, resolved once.

``ServerSettings`` is the one object the HTTP layer reads (``app.state.settings``). It is
built by :func:`load_settings` from the typed sections ``helper_functionality.yaml_loading``
validates (the spec's environment placeholders such as ``CHAT_SERVER_API_KEY`` resolved), with
the ``server.engine`` mapping validated here by the engine's own
:class:`~llm_server.engine.config.EngineConfig` (errors name ``server.engine.<key>``), or
directly in tests. The validated objects (``ModelSection``, ``EngineConfig``) are passed down as
they are. ``python -m llm_server.api.settings`` prints the README's configuration table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from llm_server.engine.config import EngineConfig
from llm_server.engine.types import SamplingParams
from llm_server.helper_functionality import yaml_loading
from llm_server.helper_functionality.config_models import (
    GENERATION_DEFAULTS,
    AzureSection,
    ModelParameters,
    ModelSection,
    ServerSection,
    markdown_table,
    validate_section,
)
from llm_server.helper_functionality.yaml_loading import DEFAULT_HOST, SERVER_CONFIG_FILE, resolve_placeholder
from llm_server.serving.sampling import sampling_defaults

#: The sections a layer above the YAML loaders validates: (dotted section, its model).
NESTED_SECTIONS = (("server.engine", EngineConfig),)


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
    default_params: SamplingParams = field(
        default_factory=lambda: sampling_defaults(GENERATION_DEFAULTS, _DEFAULT.limits.max_new_tokens))

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


def engine_options(engine: EngineConfig, parameters: ModelParameters) -> EngineConfig:
    """server_config ``engine:``, with model_config ``parameters.top_k`` as the engine's top_k.

    The batching engine applies one top_k to every sampled request; ``server.engine.top_k``
    wins when both are set.
    """
    if engine.top_k is None and parameters.top_k is not None:
        return engine.model_copy(update={"top_k": parameters.top_k})
    return engine


def engine_config(raw: Mapping[str, Any] | EngineConfig) -> EngineConfig:
    """The ``server.engine`` mapping validated by the engine's EngineConfig (ConfigError naming the key)."""
    if isinstance(raw, EngineConfig):
        return raw
    return validate_section(EngineConfig, raw, yaml_loading.config_dir() / SERVER_CONFIG_FILE, "server.engine")


def settings_from_config(
    server: Mapping[str, Any] | ServerSection,
    azure: Mapping[str, Any] | AzureSection | None = None,
    model: Mapping[str, Any] | ModelSection | None = None,
    system_prompts: Mapping[str, str] | None = None,
) -> ServerSettings:
    """Build settings from the config sections: typed, as written (``read_server_section()`` ...:
    placeholders resolve here) or the spec's loaders' mappings (``load_chat_server_config()`` ...:
    already resolved)."""
    resolve = resolve_placeholder if isinstance(server, ServerSection) else _as_given
    server = server if isinstance(server, ServerSection) else ServerSection.model_validate(server)
    azure = azure if isinstance(azure, AzureSection) else AzureSection.model_validate(azure or {})
    section = model if isinstance(model, ModelSection) else ModelSection.model_validate(model or {})
    limit = server.limits.max_new_tokens
    return ServerSettings(
        host=resolve(server.host, DEFAULT_HOST) or DEFAULT_HOST,
        port=server.port,
        api_keys=split_keys(resolve(server.api_key, None)),
        allow_query_api_key=server.allow_query_api_key,
        open_access=server.open_access,
        metrics_require_key=server.metrics_require_key,
        key_refresh_interval_s=float(server.key_refresh_interval_s),
        shutdown_timeout_s=float(server.shutdown_timeout_s),
        max_new_tokens_limit=limit,
        max_body_bytes=server.limits.max_body_bytes,
        request_head_timeout_s=float(server.limits.request_head_timeout_s),
        request_body_timeout_s=float(server.limits.request_body_timeout_s),
        log_format=server.log_format,
        engine=engine_options(engine_config(server.engine), section.parameters),
        key_vault_url=resolve(azure.key_vault_url, None),
        key_vault_secret_name=resolve(azure.api_key_secret_name, None),
        model=section,
        system_prompts=dict(system_prompts) if system_prompts else ServerSettings().system_prompts,
        default_params=sampling_defaults(section.parameters, limit),
    )


def _as_given(value: str | None, default: str | None) -> str | None:
    return value if value else default


def load_settings() -> ServerSettings:
    """Read the four YAML files (from the configured folder) into ServerSettings."""
    return settings_from_config(
        yaml_loading.read_server_section(),
        yaml_loading.read_azure_section(),
        yaml_loading.read_model_section(),
        yaml_loading.load_system_prompt(),
    )


def config_table() -> str:
    """The README's configuration reference: every key of every file, the engine's included."""
    return markdown_table(NESTED_SECTIONS)


if __name__ == "__main__":  # python -m llm_server.api.settings > the README's table
    print(config_table())
