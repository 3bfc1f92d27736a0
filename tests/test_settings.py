"""Server settings from a config folder (load_settings): model defaults that reach the engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_server.api.settings import ServerSettings, load_settings
from llm_server.helper_functionality.yaml_loading import CONFIG_DIR_ENV

MODEL_CONFIG = """\
model:
  id: "embedded:SmolLM2-135M-Instruct"
  parameters:
    max_new_tokens: 64
    temperature: 0.7
    top_p: 0.9
{top_k}    do_sample: true
"""
SERVER_CONFIG = """\
server:
  engine:
    max_running: 4
{top_k}"""


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from llm_server.helper_functionality import yaml_loading

    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    yaml_loading.set_config_dir(None)
    yield tmp_path
    yaml_loading.set_config_dir(None)


def _settings(folder: Path, model_top_k: int | None, engine_top_k: int | None = None) -> ServerSettings:
    model_line = f"    top_k: {model_top_k}\n" if model_top_k is not None else ""
    engine_line = f"    top_k: {engine_top_k}\n" if engine_top_k is not None else ""
    (folder / "model_config.yaml").write_text(MODEL_CONFIG.format(top_k=model_line))
    (folder / "server_config.yaml").write_text(SERVER_CONFIG.format(top_k=engine_line))
    return load_settings()


def test_model_parameters_top_k_reaches_the_engine(config_dir: Path) -> None:
    settings = _settings(config_dir, model_top_k=20)
    assert settings.engine.top_k == 20  # the EngineConfig the server's engine loader receives
    assert settings.engine.max_running == 4  # the server's own engine keys are kept


def test_model_parameters_top_k_zero_turns_top_k_off(config_dir: Path) -> None:
    assert _settings(config_dir, model_top_k=0).engine.top_k == 0


def test_server_engine_top_k_wins(config_dir: Path) -> None:
    assert _settings(config_dir, model_top_k=20, engine_top_k=5).engine.top_k == 5


def test_no_top_k_anywhere_leaves_the_engine_default(config_dir: Path) -> None:
    assert _settings(config_dir, model_top_k=None).engine.top_k is None


def test_model_section_is_typed_and_defaults_reach_requests(config_dir: Path) -> None:
    """The model section arrives typed; its parameters become the request defaults (capped)."""
    (config_dir / "model_config.yaml").write_text(
        'model:\n  id: "my-org/my-model"\n  parameters:\n    max_new_tokens: 5000\n    temperature: 0.2\n'
    )
    (config_dir / "server_config.yaml").write_text("server:\n  limits:\n    max_new_tokens: 300\n")
    settings = load_settings()
    assert settings.model.id == "my-org/my-model" and settings.served_model_name == "my-org/my-model"
    assert settings.model.optimizations.dtype == "auto"  # the model's default, not a copy of it here
    assert settings.default_params.max_new_tokens == 300
    assert settings.default_params.temperature == 0.2


def test_defaults_without_any_file_match_the_models() -> None:
    """ServerSettings() built in code and the config models agree on every shared default."""
    from llm_server.api.settings import engine_config
    from llm_server.helper_functionality.config_models import GENERATION_DEFAULTS, ServerLimits, ServerSection
    from llm_server.serving.sampling import sampling_defaults

    settings, section = ServerSettings(), ServerSection()
    assert settings.engine == engine_config(section.engine)
    assert settings.default_params == sampling_defaults(GENERATION_DEFAULTS, ServerLimits().max_new_tokens)
    assert (settings.port, settings.allow_query_api_key, settings.open_access) == (
        section.port, section.allow_query_api_key, section.open_access)
    assert (settings.metrics_require_key, settings.key_refresh_interval_s, settings.shutdown_timeout_s) == (
        section.metrics_require_key, section.key_refresh_interval_s, section.shutdown_timeout_s)
    assert (settings.max_new_tokens_limit, settings.max_body_bytes) == (
        ServerLimits().max_new_tokens, ServerLimits().max_body_bytes)
