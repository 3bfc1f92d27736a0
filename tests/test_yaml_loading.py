"""YAML loading: shipped defaults, env placeholders, custom config folders, and error reporting."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_server.api.settings import config_table, load_settings
from llm_server.engine.config import EngineConfig
from llm_server.helper_functionality import config_models, yaml_loading
from llm_server.helper_functionality.yaml_loading import (
    ConfigError,
    config_dir,
    load_azure_config,
    load_chat_server_config,
    load_model_config,
    load_system_prompt,
    load_yaml,
    set_config_dir,
)

PLACEHOLDER_VARS = ("CHAT_SERVER_HOST", "CHAT_SERVER_API_KEY", "KEYVAULT_URL", "API_KEY_SECRET_NAME")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts from the package defaults with no placeholder variable set."""
    for name in (*PLACEHOLDER_VARS, "LLM_SERVER_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    set_config_dir(None)
    yield
    set_config_dir(None)


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- shipped defaults


def test_model_config_defaults_to_the_embedded_model() -> None:
    config = load_model_config()
    assert config["id"] == "embedded:SmolLM2-135M-Instruct"
    assert config["device"] == "auto"
    assert set(config["parameters"]) >= {"max_new_tokens", "temperature", "top_p", "do_sample", "repetition_penalty"}
    optimizations = {"dtype", "attn_implementation", "compile", "quantization", "matmul_precision"}
    assert set(config["optimizations"]) == optimizations


def test_system_prompts_have_assistant_reviser_and_the_spec_examples() -> None:
    prompts = load_system_prompt()
    assert {"assistant", "reviser", "code_reviewer", "technical_writer"} <= set(prompts)
    # the spec's reviser example; each improvement pass's request states the output it wants (issue 20)
    assert "taking the user's drafts and improving them" in prompts["reviser"]


def test_server_config_has_the_contract_keys() -> None:
    server = load_chat_server_config()
    assert server["port"] == 8000
    assert server["allow_query_api_key"] is True and server["open_access"] is False
    assert server["limits"] == {"max_new_tokens": 1024, "max_body_bytes": 1048576,
                                "request_head_timeout_s": 30, "request_body_timeout_s": 30}
    assert set(server["engine"]) <= set(EngineConfig.model_fields)  # the engine's own keys, one copy
    engine = load_settings().engine  # validated by the engine's own model
    assert isinstance(engine, EngineConfig) and engine.top_k is None  # optional keys present, unset


# --------------------------------------------------------------------------- placeholders


def test_unset_placeholders_give_default_host_and_no_key() -> None:
    server = load_chat_server_config()
    assert server["host"] == "0.0.0.0"
    assert server["api_key"] is None
    assert load_azure_config() == {"key_vault_url": None, "api_key_secret_name": None}


def test_set_placeholders_resolve_to_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_SERVER_HOST", "127.0.0.1")
    monkeypatch.setenv("CHAT_SERVER_API_KEY", "k1,k2")
    monkeypatch.setenv("KEYVAULT_URL", "https://vault.example.net/")
    monkeypatch.setenv("API_KEY_SECRET_NAME", "chat-key")
    server = load_chat_server_config()
    assert (server["host"], server["api_key"]) == ("127.0.0.1", "k1,k2")
    assert load_azure_config() == {"key_vault_url": "https://vault.example.net/", "api_key_secret_name": "chat-key"}


def test_empty_variables_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_SERVER_HOST", "")
    monkeypatch.setenv("CHAT_SERVER_API_KEY", "  ")
    server = load_chat_server_config()
    assert server["host"] == "0.0.0.0"
    assert server["api_key"] is None


def test_literal_values_are_kept_and_braced_references_expand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_PORTLESS_HOST", "10.0.0.5")
    write(tmp_path, "server_config.yaml", 'server:\n  host: "${MY_PORTLESS_HOST}"\n  api_key: "literal-key"\n')
    write(tmp_path, "azure_config.yaml", 'azure:\n  key_vault_url: "${NOT_SET_ANYWHERE:-https://x.vault.azure.net/}"\n')
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    server = load_chat_server_config()
    assert (server["host"], server["api_key"]) == ("10.0.0.5", "literal-key")
    azure = load_azure_config()
    assert azure["key_vault_url"] == "https://x.vault.azure.net/"
    assert azure["api_key_secret_name"] is None


def test_system_prompts_never_expand_environment_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_THING", "do-not-leak")
    write(tmp_path, "system_prompt_config.yaml", 'system_prompts:\n  assistant: "Use ${SECRET_THING}."\n')
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    assert load_system_prompt()["assistant"] == "Use ${SECRET_THING}."


# --------------------------------------------------------------------------- config folders


def test_env_config_dir_overrides_files_it_contains_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "model_config.yaml", 'model:\n  id: "my-org/my-model"\n  parameters:\n    max_new_tokens: 7\n')
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    assert config_dir() == tmp_path.resolve()
    config = load_model_config()
    assert config["id"] == "my-org/my-model"
    assert config["parameters"] == {"max_new_tokens": 7}
    assert "reviser" in load_system_prompt()  # not in the custom folder: the package default
    assert load_chat_server_config()["port"] == 8000


def test_set_config_dir_wins_over_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_env, from_cli = tmp_path / "env", tmp_path / "cli"
    write(from_env, "model_config.yaml", 'model:\n  id: "from-env"\n')
    write(from_cli, "model_config.yaml", 'model:\n  id: "from-cli"\n')
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(from_env))
    set_config_dir(from_cli)
    assert load_model_config()["id"] == "from-cli"
    assert os.environ["LLM_SERVER_CONFIG_DIR"] == str(from_cli.resolve())  # seen by worker processes too
    set_config_dir(None)
    assert load_model_config()["id"] == "from-env"
    assert os.environ["LLM_SERVER_CONFIG_DIR"] == str(from_env)


def test_set_config_dir_none_goes_back_to_the_package_default(tmp_path: Path) -> None:
    write(tmp_path, "model_config.yaml", 'model:\n  id: "from-cli"\n')
    set_config_dir(tmp_path)
    set_config_dir(tmp_path)  # set twice: None still restores the state before the first
    set_config_dir(None)
    assert "LLM_SERVER_CONFIG_DIR" not in os.environ
    assert config_dir() == yaml_loading.PACKAGE_CONFIG_DIR


def test_missing_config_folders_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        set_config_dir(tmp_path / "nope")
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="LLM_SERVER_CONFIG_DIR"):
        load_model_config()


def test_load_yaml_reads_names_paths_and_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    custom = write(tmp_path, "custom_model_config.yaml", "model:\n  id: custom\n")
    assert load_yaml(custom) == {"model": {"id": "custom"}}
    monkeypatch.chdir(tmp_path)
    assert load_yaml("custom_model_config.yaml")["model"]["id"] == "custom"
    assert "model" in load_yaml("model_config.yaml")  # package default by bare name


# --------------------------------------------------------------------------- errors


def test_missing_file_names_the_file() -> None:
    with pytest.raises(ConfigError) as caught:
        load_yaml("does_not_exist.yaml")
    assert "does_not_exist.yaml" in str(caught.value) and "not found" in str(caught.value)


def test_malformed_yaml_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "server_config.yaml", "server:\n  port: [8000\n")
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        load_chat_server_config()
    assert caught.value.file.endswith("server_config.yaml")
    assert "invalid YAML" in str(caught.value)


@pytest.mark.parametrize(
    ("file", "text", "loader", "key"),
    [
        ("server_config.yaml", "other:\n  port: 1\n", load_chat_server_config, "server"),
        ("azure_config.yaml", "azure: [1, 2]\n", load_azure_config, "azure"),
        ("system_prompt_config.yaml", "prompts: {}\n", load_system_prompt, "system_prompts"),
        ("model_config.yaml", "- just\n- a list\n", load_model_config, None),
    ],
)
def test_missing_or_malformed_sections_name_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file: str, text: str, loader, key: str | None
) -> None:
    write(tmp_path, file, text)
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        loader()
    assert caught.value.file.endswith(file)
    assert caught.value.key == key


@pytest.mark.parametrize(
    ("file", "text", "loader", "key"),
    [
        ("server_config.yaml", 'server:\n  port: "eighty"\n', load_chat_server_config, "server.port"),
        ("server_config.yaml", "server:\n  port: true\n", load_chat_server_config, "server.port"),
        ("server_config.yaml", "server:\n  port: 70000\n", load_chat_server_config, "server.port"),
        ("server_config.yaml", "server:\n  limits:\n    max_new_tokens: lots\n", load_chat_server_config,
         "server.limits.max_new_tokens"),
        ("server_config.yaml", "server:\n  engine: 5\n", load_chat_server_config, "server.engine"),
        ("model_config.yaml", "model:\n  parameters:\n    temperature: hot\n", load_model_config,
         "model.parameters.temperature"),
        ("model_config.yaml", "model:\n  parameters:\n    max_new_tokens: 0\n", load_model_config,
         "model.parameters.max_new_tokens"),
        ("model_config.yaml", "model:\n  parameters:\n    top_k: -1\n", load_model_config,
         "model.parameters.top_k"),
        ("model_config.yaml", "model:\n  parameters:\n    streamer: x\n", load_model_config,
         "model.parameters.streamer"),
        ("model_config.yaml", "model:\n  optimizations:\n    compile: 3\n", load_model_config,
         "model.optimizations.compile"),
        ("system_prompt_config.yaml", "system_prompts:\n  assistant: [1]\n", load_system_prompt,
         "system_prompts.assistant"),
        ("system_prompt_config.yaml", "system_prompts:\n  reviser: hi\n", load_system_prompt,
         "system_prompts.assistant"),
    ],
)  # fmt: skip
def test_wrong_values_name_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file: str, text: str, loader, key: str
) -> None:
    write(tmp_path, file, text)
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        loader()
    assert caught.value.file.endswith(file)
    assert caught.value.key == key
    assert key in str(caught.value) and file in str(caught.value)


def test_empty_file_is_a_missing_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "azure_config.yaml", "")
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="missing section"):
        load_azure_config()


def test_package_folder_is_the_default() -> None:
    assert config_dir() == yaml_loading.PACKAGE_CONFIG_DIR
    for name in yaml_loading.STANDARD_FILES:
        assert (yaml_loading.PACKAGE_CONFIG_DIR / name).is_file()


def test_engine_section_accepts_optional_keys_and_rejects_unknown(tmp_path, monkeypatch) -> None:
    """server.engine: optional keys pass through typed; a typo is an error naming the key."""
    from llm_server.helper_functionality import yaml_loading

    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    (tmp_path / "server_config.yaml").write_text(
        "server:\n  port: 8000\n  engine:\n    max_running: 4\n    top_k: 0\n    seed: 7\n    pack_weights: false\n"
    )
    engine = load_settings().engine
    assert engine.max_running == 4 and engine.top_k == 0 and engine.seed == 7
    assert engine.pack_weights is False and engine.prefill_chunk_tokens == 1024

    (tmp_path / "server_config.yaml").write_text("server:\n  engine:\n    max_runing: 4\n")
    with pytest.raises(yaml_loading.ConfigError, match="server.engine.max_runing"):
        load_settings()

    (tmp_path / "server_config.yaml").write_text("server:\n  engine:\n    top_k: -1\n")
    with pytest.raises(yaml_loading.ConfigError, match="server.engine.top_k"):
        load_settings()


@pytest.mark.parametrize(
    ("file", "text", "key"),
    [
        ("server_config.yaml", "server:\n  prot: 8000\n", "server.prot"),
        ("server_config.yaml", "server:\n  limits:\n    max_new_token: 5\n", "server.limits.max_new_token"),
        ("model_config.yaml", "model:\n  id: x\n  devise: cpu\n", "model.devise"),
        ("model_config.yaml", "model:\n  id: x\n  optimizations:\n    dtpye: float32\n", "model.optimizations.dtpye"),
    ],
)
def test_misspelt_keys_are_errors_naming_the_key(tmp_path, monkeypatch, file: str, text: str, key: str) -> None:
    """A typo in a setting must not be silently ignored (the setting would quietly not apply)."""
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    (tmp_path / file).write_text(text)
    loader = yaml_loading.load_chat_server_config if file.startswith("server") else yaml_loading.load_model_config
    with pytest.raises(yaml_loading.ConfigError, match=key.replace(".", r"\.")):
        loader()


def test_the_specs_model_config_example_still_loads(tmp_path, monkeypatch) -> None:
    """The spec's model_config.yaml example (with type and return_dict_in_generate) is valid."""
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    (tmp_path / "model_config.yaml").write_text(
        'model:\n  type: "llm"\n  id: "meta-llama/Llama-3.1-8B-Instruct"\n  device: "auto"\n'
        "  parameters:\n    max_new_tokens: 4096\n    temperature: 0.7\n    top_p: 0.9\n"
        "    do_sample: True\n    use_cache: True\n    return_dict_in_generate: True\n"
    )
    assert yaml_loading.load_model_config()["parameters"]["return_dict_in_generate"] is True


@pytest.mark.parametrize("value", ["null", '"4bit"', '"int8"', '"int4"'])
def test_quantization_accepts_the_documented_modes(tmp_path, monkeypatch, value: str) -> None:
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    write(tmp_path, "model_config.yaml", f"model:\n  optimizations:\n    quantization: {value}\n")
    expected = None if value == "null" else value.strip('"')
    assert load_model_config()["optimizations"]["quantization"] == expected


@pytest.mark.parametrize(
    ("file", "text", "key", "words"),
    [
        ("model_config.yaml", 'model:\n  optimizations:\n    quantization: "int3"\n',
         "model.optimizations.quantization", "'4bit', 'int8', 'int4' or 'auto'"),
        ("model_config.yaml", "model:\n  parameters:\n    top_p: 1.5\n", "model.parameters.top_p", "1.5"),
        ("model_config.yaml", "model:\n  parameters:\n    do_sample: 1\n", "model.parameters.do_sample", "got int"),
        ("model_config.yaml", "model:\n  parameters:\n    streamer: x\n", "model.parameters.streamer",
         "set by the Python API on each call; remove it"),
        ("server_config.yaml", "server:\n  engine:\n    pack_weights: 1\n", "server.engine.pack_weights", "got int"),
        ("server_config.yaml", "server:\n  engine:\n    max_running: 0\n", "server.engine.max_running",
         "greater than or equal to 1"),
        ("server_config.yaml", "server:\n  port: 0\n", "server.port", "greater than or equal to 1"),
        ("server_config.yaml", "server:\n  limits: [1]\n", "server.limits", "expected a mapping"),
        ("azure_config.yaml", "azure:\n  key_vault: x\n", "azure.key_vault", "unknown key"),
        ("azure_config.yaml", "azure:\n  key_vault_url: 5\n", "azure.key_vault_url", "got int"),
    ],
)  # fmt: skip
def test_typed_errors_name_key_and_value(tmp_path, monkeypatch, file: str, text: str, key: str, words: str) -> None:
    """Each wrong value names the file, the dotted key, and what was wrong with it."""
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    write(tmp_path, file, text)
    loader = {"model_config.yaml": load_model_config, "server_config.yaml": load_chat_server_config,
              "azure_config.yaml": load_azure_config}[file]
    if key.startswith("server.engine."):  # the engine's section: validated by its own model, with the settings
        loader = load_settings
    with pytest.raises(ConfigError) as caught:
        loader()
    assert caught.value.key == key and caught.value.file.endswith(file)
    assert words in str(caught.value)


def test_unknown_key_lists_the_known_ones(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    write(tmp_path, "server_config.yaml", "server:\n  engine:\n    max_runing: 4\n")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    for known in EngineConfig.model_fields:
        assert known in caught.value.problem


def test_null_means_the_default(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    write(tmp_path, "server_config.yaml", "server:\n  port: null\n  limits:\n  engine:\n    max_running: null\n")
    server = load_chat_server_config()
    assert server["port"] == 8000 and server["limits"]["max_new_tokens"] == 1024
    assert load_settings().engine.max_running == EngineConfig().max_running


def test_parameters_pass_other_generate_keywords_through(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    write(tmp_path, "model_config.yaml", "model:\n  parameters:\n    no_repeat_ngram_size: 3\n")
    assert load_model_config()["parameters"] == {"no_repeat_ngram_size": 3}


def test_shipped_server_file_restates_the_model_defaults() -> None:
    """The shipped server_config.yaml is documentation: every value there is the model's default."""
    raw = load_yaml(yaml_loading.PACKAGE_CONFIG_DIR / "server_config.yaml", expand_env=False)["server"]
    defaults = {**config_models.ServerSection().model_dump(), "engine": EngineConfig().model_dump()}
    for key, value in raw.items():
        if key in ("host", "api_key"):  # placeholders: the variable names
            continue
        if isinstance(value, dict):
            assert {k: defaults[key][k] for k in value} == value, f"server.{key} differs from its model's defaults"
        else:
            assert defaults[key] == value, f"server.{key} differs from its model's default"


def test_readme_config_table_matches_the_models() -> None:
    """README's reference table is generated from the models: regenerate it when a key changes
    (``python -m llm_server.api.settings``)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- config-table:start -->\n", "\n<!-- config-table:end -->"
    assert start in readme and end in readme
    table = readme[readme.index(start) + len(start) : readme.index(end)]
    assert table == config_table(), "README's config table is stale: python -m llm_server.api.settings"


def test_read_section_validates_any_declared_section(tmp_path, monkeypatch) -> None:
    """A new section (e.g. a second top-level key of server_config.yaml) needs only its model."""
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(tmp_path))
    write(tmp_path, "server_config.yaml", "server:\n  port: 8001\n")
    limits = yaml_loading.read_section("server_config.yaml", "extra", config_models.ServerLimits, required=False)
    assert limits == config_models.ServerLimits()  # absent optional section: the defaults
    with pytest.raises(ConfigError, match="missing section"):
        yaml_loading.read_section("server_config.yaml", "extra", config_models.ServerLimits)
    write(tmp_path, "server_config.yaml", "server: {}\nextra:\n  max_body_bytes: 10\n  nope: 1\n")
    with pytest.raises(ConfigError) as caught:
        yaml_loading.read_section("server_config.yaml", "extra", config_models.ServerLimits, required=False)
    assert caught.value.key == "extra.nope" and "max_body_bytes" in caught.value.problem
