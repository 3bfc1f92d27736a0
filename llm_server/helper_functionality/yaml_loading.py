"""YAML configuration: find the config folder, parse files safely, validate and resolve placeholders.

The four files (``model_config.yaml``, ``server_config.yaml``, ``azure_config.yaml``,
``system_prompt_config.yaml``) live in a *config folder*: the one given to
:func:`set_config_dir` (the CLI's ``--config-dir``), else ``$LLM_SERVER_CONFIG_DIR``, else the
package's own ``yaml_files``. A standard file missing from a custom folder is read from the
package's defaults, so a custom folder may hold only the files it changes.

Environment placeholders: ``server.host``, ``server.api_key``, ``azure.key_vault_url`` and
``azure.api_key_secret_name`` may hold the NAME of an environment variable (capitals, digits,
underscores, e.g. ``CHAT_SERVER_API_KEY``); the value is that variable's. An unset or empty
variable means: host -> ``0.0.0.0``; key / vault settings -> ``None`` ("not configured"). Any
string value outside the system prompts may also use ``${VAR}`` or ``${VAR:-default}``.

Every problem raises :class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

#: The package's default config folder.
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "yaml_files"
#: Environment variable choosing another config folder.
CONFIG_DIR_ENV = "LLM_SERVER_CONFIG_DIR"

MODEL_CONFIG_FILE = "model_config.yaml"
SERVER_CONFIG_FILE = "server_config.yaml"
AZURE_CONFIG_FILE = "azure_config.yaml"
SYSTEM_PROMPT_FILE = "system_prompt_config.yaml"
STANDARD_FILES = (MODEL_CONFIG_FILE, SERVER_CONFIG_FILE, AZURE_CONFIG_FILE, SYSTEM_PROMPT_FILE)

DEFAULT_HOST = "0.0.0.0"

_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

_config_dir_override: Path | None = None
#: $LLM_SERVER_CONFIG_DIR as it was before set_config_dir() replaced it.
_env_before_override: str | None = None


class ConfigError(ValueError):
    """A configuration file is missing, malformed, or holds a wrong value.

    ``file`` is the file's path and ``key`` the dotted key (None for whole-file problems).
    """

    def __init__(self, file: str | Path, key: str | None, problem: str) -> None:
        where = f"{file}" if key is None else f"{file}: key '{key}'"
        super().__init__(f"{where}: {problem}")
        self.file = str(file)
        self.key = key
        self.problem = problem


# --------------------------------------------------------------------------- config folder


def set_config_dir(path: str | Path | None) -> None:
    """Choose the config folder for this process (``--config-dir``); call before anything is loaded.

    ``$LLM_SERVER_CONFIG_DIR`` is set to the folder too, so worker processes and threads see the
    same one. None undoes that: back to the variable's earlier value, else the package default.
    """
    global _config_dir_override, _env_before_override
    if path is None:
        if _config_dir_override is not None and _env_before_override is None:
            os.environ.pop(CONFIG_DIR_ENV, None)
        elif _config_dir_override is not None:
            os.environ[CONFIG_DIR_ENV] = _env_before_override
        _config_dir_override = None
        return
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(folder, None, "config folder does not exist")
    if _config_dir_override is None:
        _env_before_override = os.environ.get(CONFIG_DIR_ENV)
    _config_dir_override = folder
    os.environ[CONFIG_DIR_ENV] = str(folder)
    logger.info("config folder set to %s", folder)


def config_dir() -> Path:
    """The config folder in use: set_config_dir(), else $LLM_SERVER_CONFIG_DIR, else the package's."""
    if _config_dir_override is not None:
        return _config_dir_override
    from_env = os.environ.get(CONFIG_DIR_ENV, "").strip()
    if from_env:
        folder = Path(from_env).expanduser()
        if not folder.is_dir():
            raise ConfigError(folder, None, f"config folder from ${CONFIG_DIR_ENV} does not exist")
        return folder.resolve()
    return PACKAGE_CONFIG_DIR


def resolve_config_path(name_or_path: str | Path, search_cwd: bool = True) -> Path:
    """Where ``load_yaml`` reads ``name_or_path`` from (see :func:`load_yaml`)."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_absolute():
        return candidate
    in_config_dir = config_dir() / candidate
    if in_config_dir.is_file():
        return in_config_dir
    if search_cwd and candidate.is_file():
        return candidate.resolve()
    in_package = PACKAGE_CONFIG_DIR / candidate
    if in_package.is_file():
        return in_package
    return in_config_dir  # reported as missing


# --------------------------------------------------------------------------- parsing


def load_yaml(name_or_path: str | Path, expand_env: bool = True) -> dict[str, Any]:
    """Parse one YAML file safely and return its top-level mapping.

    A bare name is looked up in the config folder, then relative to the working directory,
    then in the package's defaults; an absolute path is used as is. With ``expand_env``,
    ``${VAR}`` / ``${VAR:-default}`` references in string values are expanded.
    """
    path = resolve_config_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found") from None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read file: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(path, None, f"invalid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, None, f"expected a mapping at top level, got {type(data).__name__}")
    logger.debug("loaded %s", path)
    return _expand_references(data) if expand_env else data


def _expand_references(value: Any) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` inside every string of a parsed document."""
    if isinstance(value, str):
        return _ENV_REFERENCE.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, dict):
        return {key: _expand_references(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand_references(item) for item in value]
    return value


def resolve_placeholder(value: Any, default: str | None = None) -> str | None:
    """An env-var name resolves to the variable's value; unset/empty -> ``default``.

    Values that are not env-var names (not all capitals) are returned unchanged; an empty
    value or None gives ``default``.
    """
    if value is None:
        return default
    text = str(value).strip()
    if not text:
        return default
    if _ENV_NAME.match(text):
        resolved = os.environ.get(text, "").strip()
        return resolved or default
    return text


# --------------------------------------------------------------------------- validation helpers


def _section(data: Mapping[str, Any], name: str, file: Path) -> dict[str, Any]:
    if name not in data:
        raise ConfigError(file, name, "missing section")
    section = data[name]
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(file, name, f"expected a mapping, got {type(section).__name__}")
    return dict(section)


def _check_type(section: Mapping[str, Any], key: str, types: tuple[type, ...], file: Path, prefix: str) -> None:
    """Raise ConfigError when ``section[key]`` is present, not None, and not of ``types``."""
    if key not in section or section[key] is None:
        return
    value = section[key]
    # bool is a subclass of int: refuse true/false where a number is expected.
    wrong_bool = isinstance(value, bool) and bool not in types
    if wrong_bool or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise ConfigError(file, f"{prefix}{key}", f"expected {expected}, got {type(value).__name__} ({value!r})")


def _reject_unknown(section: Mapping[str, Any], allowed: Iterable[str], file: Path, prefix: str) -> None:
    """A misspelt key must not be silently ignored: name it and the keys that exist."""
    known = set(allowed)
    for key in section:
        if key not in known:
            raise ConfigError(file, f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(known))})")


def _check_mapping(section: dict[str, Any], key: str, file: Path, prefix: str) -> dict[str, Any]:
    value = section.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(file, f"{prefix}{key}", f"expected a mapping, got {type(value).__name__}")
    return dict(value)


def _file(name: str) -> Path:
    """A standard file: from the config folder, else the package's default (never the cwd)."""
    return resolve_config_path(name, search_cwd=False)


# --------------------------------------------------------------------------- model_config.yaml

_NUMBER = (int, float)
_MODEL_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "device": (str, int),
    "served_name": (str,),
    "type": (str,),
}
_PARAMETER_TYPES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,),
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "top_k": (int,),
    "do_sample": (bool,),
    "repetition_penalty": _NUMBER,
    "use_cache": (bool,),
    "return_dict_in_generate": (bool,),
}
#: model.generate keywords the Python API sets itself on each call: not allowed in ``parameters``.
_PARAMETERS_SET_PER_CALL = ("inputs", "input_ids", "attention_mask", "streamer", "stopping_criteria")
_OPTIMIZATION_TYPES: dict[str, tuple[type, ...]] = {
    "dtype": (str,),
    "attn_implementation": (str,),
    "compile": (bool, str),
    "quantization": (str, bool),
    "matmul_precision": (str,),
}


def load_model_config() -> dict[str, Any]:
    """The ``model`` section of model_config.yaml (id, device, served_name, parameters, optimizations)."""
    file = _file(MODEL_CONFIG_FILE)
    section = _section(load_yaml(file), "model", file)
    _reject_unknown(section, [*_MODEL_TYPES, "parameters", "optimizations"], file, "model.")
    for key, types in _MODEL_TYPES.items():
        _check_type(section, key, types, file, "model.")
    parameters = _check_mapping(section, "parameters", file, "model.")
    for key, types in _PARAMETER_TYPES.items():
        _check_type(parameters, key, types, file, "model.parameters.")
    for key in _PARAMETERS_SET_PER_CALL:
        if key in parameters:
            raise ConfigError(file, f"model.parameters.{key}", "is set by the Python API on each call; remove it")
    for key, minimum in (("max_new_tokens", 1), ("top_k", 0)):
        if parameters.get(key) is not None and parameters[key] < minimum:
            raise ConfigError(file, f"model.parameters.{key}", f"must be at least {minimum}")
    optimizations = _check_mapping(section, "optimizations", file, "model.")
    _reject_unknown(optimizations, _OPTIMIZATION_TYPES, file, "model.optimizations.")
    for key, types in _OPTIMIZATION_TYPES.items():
        _check_type(optimizations, key, types, file, "model.optimizations.")
    section["parameters"] = parameters
    section["optimizations"] = optimizations
    return section


# --------------------------------------------------------------------------- system_prompt_config.yaml


def load_system_prompt() -> dict[str, str]:
    """The ``system_prompts`` section: role name -> system prompt text (``assistant`` required)."""
    file = _file(SYSTEM_PROMPT_FILE)
    # No ${VAR} expansion in prompts: prompt text must never pull in environment values.
    prompts = _section(load_yaml(file, expand_env=False), "system_prompts", file)
    for role, text in prompts.items():
        if not isinstance(text, str):
            raise ConfigError(file, f"system_prompts.{role}", f"expected a string, got {type(text).__name__}")
    if "assistant" not in prompts:
        raise ConfigError(file, "system_prompts.assistant", "missing (the default role)")
    return {str(role): text.strip() for role, text in prompts.items()}


# --------------------------------------------------------------------------- server_config.yaml

_SERVER_DEFAULTS: dict[str, Any] = {
    "port": 8000,
    "allow_query_api_key": True,
    "open_access": False,
    "metrics_require_key": False,
    "key_refresh_interval_s": 300,
    "shutdown_timeout_s": 30,
}
_SERVER_TYPES: dict[str, tuple[type, ...]] = {
    "host": (str,),
    "port": (int,),
    "api_key": (str,),
    "allow_query_api_key": (bool,),
    "open_access": (bool,),
    "metrics_require_key": (bool,),
    "key_refresh_interval_s": _NUMBER,
    "shutdown_timeout_s": _NUMBER,
}
_LIMIT_DEFAULTS: dict[str, int] = {"max_new_tokens": 1024, "max_body_bytes": 1048576}
_ENGINE_DEFAULTS: dict[str, int] = {
    "max_running": 16,
    "max_waiting": 64,
    "max_total_tokens": 32768,
    "prefill_chunk_tokens": 1024,
    "retry_after_s": 1,
}
# Optional engine keys: (allowed types, smallest allowed int). Absent or null -> engine default.
_ENGINE_OPTIONAL: dict[str, tuple[tuple[type, ...], int]] = {
    "max_context": ((int,), 1),
    "seed": ((int,), 0),
    "top_k": ((int,), 0),
    "pack_weights": ((bool,), 0),
}


def load_chat_server_config() -> dict[str, Any]:
    """The ``server`` section, placeholders resolved and defaults filled in.

    ``host``: from the env var it names, ``0.0.0.0`` when unset. ``api_key``: the env var's
    value (possibly several comma-separated keys) or None when not configured.
    """
    file = _file(SERVER_CONFIG_FILE)
    section = _section(load_yaml(file), "server", file)
    _reject_unknown(section, [*_SERVER_TYPES, "limits", "engine"], file, "server.")
    for key, types in _SERVER_TYPES.items():
        _check_type(section, key, types, file, "server.")
    server = {**_SERVER_DEFAULTS, **{k: v for k, v in section.items() if v is not None}}
    server["host"] = resolve_placeholder(section.get("host"), DEFAULT_HOST)
    server["api_key"] = resolve_placeholder(section.get("api_key"), None)
    if not 0 < server["port"] < 65536:
        raise ConfigError(file, "server.port", f"must be between 1 and 65535, got {server['port']}")
    _reject_unknown(_check_mapping(section, "limits", file, "server."), _LIMIT_DEFAULTS, file, "server.limits.")
    server["limits"] = _int_subsection(section, "limits", _LIMIT_DEFAULTS, file)
    server["engine"] = _engine_subsection(section, file)
    return server


def _engine_subsection(section: dict[str, Any], file: Path) -> dict[str, Any]:
    """``server.engine``: the positive-int limits plus the optional keys; unknown keys are errors."""
    values = dict(_check_mapping(section, "engine", file, "server."))
    optional = {k: values.pop(k) for k in list(values) if k in _ENGINE_OPTIONAL}
    for key in values:
        if key not in _ENGINE_DEFAULTS:
            known = ", ".join([*_ENGINE_DEFAULTS, *_ENGINE_OPTIONAL])
            raise ConfigError(file, f"server.engine.{key}", f"unknown key (known: {known})")
    engine = _int_subsection({"engine": values}, "engine", _ENGINE_DEFAULTS, file)
    for key, value in optional.items():
        if value is None:
            continue
        types, minimum = _ENGINE_OPTIONAL[key]
        _check_type(optional, key, types, file, "server.engine.")
        if types == (int,) and value < minimum:
            raise ConfigError(file, f"server.engine.{key}", f"must be at least {minimum}")
        engine[key] = value
    return engine


def _int_subsection(section: dict[str, Any], name: str, defaults: dict[str, int], file: Path) -> dict[str, Any]:
    values = _check_mapping(section, name, file, "server.")
    for key in values:
        _check_type(values, key, (int,), file, f"server.{name}.")
        if isinstance(values[key], int) and values[key] < 1:
            raise ConfigError(file, f"server.{name}.{key}", "must be at least 1")
    return {**defaults, **{k: v for k, v in values.items() if v is not None}}


# --------------------------------------------------------------------------- azure_config.yaml


def load_azure_config() -> dict[str, Any]:
    """The ``azure`` section; ``key_vault_url`` / ``api_key_secret_name`` are None when not configured."""
    file = _file(AZURE_CONFIG_FILE)
    section = _section(load_yaml(file), "azure", file)
    for key in ("key_vault_url", "api_key_secret_name"):
        _check_type(section, key, (str,), file, "azure.")
        section[key] = resolve_placeholder(section.get(key), None)
    return section
