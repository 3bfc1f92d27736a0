"""Server settings: ``server_config.yaml`` + ``azure_config.yaml`` + model defaults, resolved once.

``ServerSettings`` is the one object the HTTP layer reads (``app.state.settings``). It is
built from the YAML files by :func:`load_settings` (through ``helper_functionality.yaml_loading``,
which validates them and resolves the spec's environment placeholders such as
``CHAT_SERVER_API_KEY``) or directly in tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from llm_server.engine.types import SamplingParams
from llm_server.helper_functionality.yaml_loading import CONFIG_DIR_ENV, DEFAULT_HOST

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000


def _text(value: Any) -> str | None:
    """A configured string; None and blank mean "not configured"."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def split_keys(raw: str | None) -> tuple[str, ...]:
    """``"k1, k2"`` -> ``("k1", "k2")``: several keys may be valid at once (rotation)."""
    if not raw:
        return ()
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class ServerSettings:
    """Everything the HTTP layer needs to know about its configuration."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
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


def _section(config: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    """Accept both ``{"server": {...}}`` and the inner mapping itself."""
    if not config:
        return {}
    inner = config.get(name)
    return inner if isinstance(inner, Mapping) else config


def _bool(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def default_sampling(parameters: Mapping[str, Any], max_new_tokens_limit: int) -> SamplingParams:
    """model_config ``parameters`` -> SamplingParams, with max_new_tokens capped by the server limit."""
    base = SamplingParams()
    wanted = int(parameters.get("max_new_tokens", base.max_new_tokens))
    return SamplingParams(
        max_new_tokens=max(1, min(wanted, max_new_tokens_limit)),
        temperature=float(parameters.get("temperature", base.temperature)),
        top_p=float(parameters.get("top_p", base.top_p)),
        do_sample=_bool(parameters.get("do_sample"), base.do_sample),
        repetition_penalty=float(parameters.get("repetition_penalty", base.repetition_penalty)),
    )


def engine_options(engine: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    """server_config ``engine:`` keys, plus model_config ``parameters.top_k`` as the engine's top_k.

    The batching engine applies one top_k to every sampled request; ``server.engine.top_k``
    wins when both are set. ``parameters.top_k`` must be 0 (off) or more to be used.
    """
    options = dict(engine)
    top_k = parameters.get("top_k")
    if options.get("top_k") is None and top_k is not None:
        if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0:
            options["top_k"] = top_k
        else:
            logger.warning("model_config parameters.top_k=%r ignored: it must be an integer >= 0 (0: off)", top_k)
    return options


def settings_from_config(
    server_config: Mapping[str, Any] | None,
    azure_config: Mapping[str, Any] | None = None,
    model_config: Mapping[str, Any] | None = None,
    system_prompts: Mapping[str, str] | None = None,
) -> ServerSettings:
    """Build settings from loaded YAML sections (placeholders already resolved by yaml_loading)."""
    server = _section(server_config, "server")
    azure = _section(azure_config, "azure")
    model = _section(model_config, "model")
    limits = server.get("limits") or {}
    limit = int(limits.get("max_new_tokens", ServerSettings.max_new_tokens_limit))
    prompts = dict(system_prompts) if system_prompts else ServerSettings().system_prompts
    return ServerSettings(
        host=_text(server.get("host")) or DEFAULT_HOST,
        port=int(server.get("port") or DEFAULT_PORT),
        api_keys=split_keys(_text(server.get("api_key"))),
        allow_query_api_key=_bool(server.get("allow_query_api_key"), True),
        open_access=_bool(server.get("open_access"), False),
        metrics_require_key=_bool(server.get("metrics_require_key"), False),
        key_refresh_interval_s=float(server.get("key_refresh_interval_s", 300)),
        shutdown_timeout_s=float(server.get("shutdown_timeout_s", 30)),
        max_new_tokens_limit=limit,
        max_body_bytes=int(limits.get("max_body_bytes", ServerSettings.max_body_bytes)),
        engine=engine_options(server.get("engine") or {}, model.get("parameters") or {}),
        key_vault_url=_text(azure.get("key_vault_url")),
        key_vault_secret_name=_text(azure.get("api_key_secret_name")),
        model=dict(model),
        system_prompts=prompts,
        default_params=default_sampling(model.get("parameters") or {}, limit),
    )


def set_config_dir(path: str) -> None:
    """Point every YAML loader at ``path`` (``--config-dir``); call before anything is loaded.

    The environment variable is set too, so worker processes and threads see the same folder.
    """
    from llm_server.helper_functionality import yaml_loading

    yaml_loading.set_config_dir(path)  # raises ConfigError when the folder does not exist
    os.environ[CONFIG_DIR_ENV] = str(yaml_loading.config_dir())


def load_settings() -> ServerSettings:
    """Read the four YAML files (from the configured folder) into ServerSettings."""
    from llm_server.helper_functionality import yaml_loading

    return settings_from_config(
        yaml_loading.load_chat_server_config(),
        yaml_loading.load_azure_config(),
        yaml_loading.load_model_config(),
        yaml_loading.load_system_prompt(),
    )
