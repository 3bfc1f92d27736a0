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

Every problem raises :class:`ConfigError` naming the file and the key. The sections' keys, types
and defaults are declared once, in :mod:`~llm_server.helper_functionality.config_models`; the
spec's loaders return them as plain dicts, the ``read_*_section`` functions as typed models.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from llm_server.helper_functionality.config_models import (
    SECTIONS,
    AzureSection,
    ConfigError,
    M,
    ModelSection,
    ServerSection,
    validate_section,
)

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
        elif _config_dir_override is not None and _env_before_override is not None:
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


# --------------------------------------------------------------------------- sections


def _section(data: Mapping[str, Any], name: str, file: Path) -> dict[str, Any]:
    if name not in data:
        raise ConfigError(file, name, "missing section")
    section = data[name]
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(file, name, f"expected a mapping, got {type(section).__name__}")
    return dict(section)


def _file(name: str) -> Path:
    """A standard file: from the config folder, else the package's default (never the cwd)."""
    return resolve_config_path(name, search_cwd=False)


def read_section(file_name: str, name: str, model: type[M], required: bool = True) -> M:
    """Section ``name`` of the config folder's ``file_name``, validated by ``model``.

    A missing section is an error when ``required``, else the model's defaults.
    """
    file = _file(file_name)
    data = load_yaml(file)
    section = _section(data, name, file) if required or name in data else {}
    return validate_section(model, section, file, name)


def _read(model: type[M], file_name: str) -> M:
    """The section that config_models.SECTIONS declares for ``model`` in ``file_name``."""
    name = next(section for file, section, known in SECTIONS if file == file_name and known is model)
    return read_section(file_name, name, model)


def read_model_section() -> ModelSection:
    """model_config.yaml's ``model`` section, typed (what the server reads)."""
    return _read(ModelSection, MODEL_CONFIG_FILE)


def read_server_section() -> ServerSection:
    """server_config.yaml's ``server`` section, typed, placeholders as written (unresolved)."""
    return _read(ServerSection, SERVER_CONFIG_FILE)


def read_azure_section() -> AzureSection:
    """azure_config.yaml's ``azure`` section, typed, placeholders as written (unresolved)."""
    return _read(AzureSection, AZURE_CONFIG_FILE)


# --------------------------------------------------------------------------- the spec's loaders


def load_model_config() -> dict[str, Any]:
    """The ``model`` section of model_config.yaml (id, device, served_name, parameters, optimizations)."""
    return read_model_section().as_dict()


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


def load_chat_server_config() -> dict[str, Any]:
    """The ``server`` section, placeholders resolved and defaults filled in.

    ``host``: from the env var it names, ``0.0.0.0`` when unset. ``api_key``: the env var's
    value (possibly several comma-separated keys) or None when not configured.
    """
    server = read_server_section().model_dump()
    server["host"] = resolve_placeholder(server["host"], DEFAULT_HOST)
    server["api_key"] = resolve_placeholder(server["api_key"], None)
    return server


def load_azure_config() -> dict[str, Any]:
    """The ``azure`` section; ``key_vault_url`` / ``api_key_secret_name`` are None when not configured."""
    return {key: resolve_placeholder(value, None) for key, value in read_azure_section().model_dump().items()}
