"""``scale_out:`` configuration and the ``--replicas`` / ``--ray-address`` command line, without
starting Ray: defaults, bad values named by key, the clear error when Ray is not installed, and
the Serve config file."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_server import cli
from llm_server.engine.config import EngineConfig
from llm_server.helper_functionality import yaml_loading
from llm_server.helper_functionality.yaml_loading import ConfigError
from llm_server.scale_out.config import ScaleOutConfig, load_scale_out_config


@pytest.fixture(autouse=True)
def _package_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(yaml_loading.CONFIG_DIR_ENV, raising=False)
    monkeypatch.delenv("CHAT_SERVER_API_KEY", raising=False)
    yield
    yaml_loading.set_config_dir(None)


def _config_dir(tmp_path: Path, scale_out: str) -> Path:
    (tmp_path / "server_config.yaml").write_text("server:\n  port: 8123\n" + scale_out, encoding="utf-8")
    return tmp_path


def test_package_defaults_feed_a_batching_engine() -> None:
    config = load_scale_out_config()
    assert config.replicas == 1 and config.autoscaling is None
    assert config.ongoing_requests(EngineConfig(max_running=16, max_waiting=64)) == 80  # not Serve's 5
    assert config.threads() == 1  # OpenMP threads follow num_cpus


def test_section_values_and_replicas_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _config_dir(tmp_path, "scale_out:\n  replicas: 3\n  num_cpus: 4\n  max_ongoing_requests: 12\n")
    monkeypatch.setenv(yaml_loading.CONFIG_DIR_ENV, str(folder))
    config = load_scale_out_config()
    assert (config.replicas, config.threads(), config.ongoing_requests(EngineConfig())) == (3, 4, 12)
    assert config.with_replicas(2).replicas == 2 and config.with_replicas(None).replicas == 3


def test_a_missing_section_means_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(yaml_loading.CONFIG_DIR_ENV, str(_config_dir(tmp_path, "")))
    assert load_scale_out_config() == ScaleOutConfig()


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("scale_out:\n  replicas: 0\n", "scale_out.replicas"),
        ("scale_out:\n  replica: 2\n", "scale_out.replica"),
        ("scale_out:\n  num_cpus: lots\n", "scale_out.num_cpus"),
        ("scale_out:\n  autoscaling: {min_replicas: 3, max_replicas: 2}\n", "scale_out.autoscaling"),
        ("scale_out: [1, 2]\n", "scale_out"),
        ("scale_out:\n  affinity_max_imbalance: -1\n", "scale_out.affinity_max_imbalance"),
        ("scale_out:\n  prefix_affinity: sometimes\n", "scale_out.prefix_affinity"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: str, key: str) -> None:
    monkeypatch.setenv(yaml_loading.CONFIG_DIR_ENV, str(_config_dir(tmp_path, section)))
    with pytest.raises(ConfigError) as caught:
        load_scale_out_config()
    assert caught.value.key == key
    assert yaml_loading.load_chat_server_config()["port"] == 8123  # the server section is unaffected


def test_cli_refuses_zero_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--replicas", "0", "--open-access"])
    assert exited.value.code == 2
    assert "--replicas must be at least 1" in capsys.readouterr().err


def test_cli_names_the_bad_scale_out_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray")
    folder = _config_dir(tmp_path, "scale_out:\n  num_gpus: -1\n")
    with pytest.raises(SystemExit) as exited:
        cli.main(["--replicas", "2", "--open-access", "--config-dir", str(folder)])
    assert exited.value.code == 2
    assert "scale_out.num_gpus" in capsys.readouterr().err


def test_without_ray_replicas_fail_naming_the_extra() -> None:
    code = ("import sys; sys.modules['ray'] = None\n"
            "from llm_server.cli import main\n"
            "main(['--replicas', '2', '--open-access'])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "pip install 'llm_server[ray]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_deployment_options_replace_serves_starving_defaults() -> None:
    pytest.importorskip("ray")
    from llm_server.api.settings import ServerSettings
    from llm_server.scale_out.deployment import deployment_options

    settings = ServerSettings(api_keys=("k",))
    fixed = deployment_options(ScaleOutConfig(replicas=2, num_cpus=2), settings)
    capacity = settings.engine.max_running + settings.engine.max_waiting
    assert fixed["num_replicas"] == 2 and fixed["max_ongoing_requests"] == capacity > 5  # not Serve's 5
    assert fixed["ray_actor_options"]["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    scaled = deployment_options(ScaleOutConfig.model_validate({"autoscaling": {"max_replicas": 4}}), settings)
    assert "num_replicas" not in scaled and scaled["autoscaling_config"]["max_replicas"] == 4


def test_prefix_affinity_is_on_by_default_and_can_be_turned_off() -> None:
    pytest.importorskip("ray")
    from llm_server.api.settings import ServerSettings
    from llm_server.scale_out.affinity_router import ROUTER_PATH
    from llm_server.scale_out.deployment import deployment_options

    settings = ServerSettings(api_keys=("k",))
    assert load_scale_out_config().prefix_affinity is True
    router = deployment_options(ScaleOutConfig(), settings)["request_router_config"]
    assert router.request_router_class == ROUTER_PATH
    assert router.request_router_kwargs == {"max_imbalance": settings.engine.max_running}  # one full batch
    chosen = deployment_options(ScaleOutConfig(affinity_max_imbalance=3), settings)["request_router_config"]
    assert chosen.request_router_kwargs == {"max_imbalance": 3}
    assert "request_router_config" not in deployment_options(ScaleOutConfig(prefix_affinity=False), settings)


def test_one_generated_key_for_every_replica(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray")
    from llm_server.api.settings import ServerSettings
    from llm_server.scale_out.deployment import pin_generated_key

    pinned = pin_generated_key(ServerSettings())
    assert len(pinned.api_keys) == 1 and pinned.api_keys[0] in capsys.readouterr().out
    configured = ServerSettings(api_keys=("mine",))
    assert pin_generated_key(configured) is configured


def test_metrics_of_replicas_are_merged_with_a_replica_label() -> None:
    pytest.importorskip("ray")
    from llm_server.scale_out.metrics import merged_text

    one = "# HELP x_total X.\n# TYPE x_total counter\nx_total{kind=\"a\"} 1.0\n"
    two = "# HELP x_total X.\n# TYPE x_total counter\nx_total{kind=\"a\"} 2.0\n"
    text = merged_text({"r1": one, "r2": two}).decode()
    assert 'x_total{kind="a",replica="r1"} 1.0' in text
    assert 'x_total{kind="a",replica="r2"} 2.0' in text
    assert text.count("# TYPE x_total counter") == 1


def test_serve_config_file_is_valid_and_installs_the_json_proxy_errors() -> None:
    """deploy/serve_config.yaml parses with Serve's own schema, and its proxy callback (the same one
    ``start_llm_server --replicas`` passes) imports and returns the JSON error middleware."""
    pytest.importorskip("ray")
    import yaml
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from llm_server.scale_out.affinity import SessionKeyMiddleware
    from llm_server.scale_out.proxy_errors import CALLBACK_ENV, JsonProxyErrors, controller_options

    config = ServeDeploySchema(**yaml.safe_load((Path(__file__).parents[1] / "deploy/serve_config.yaml").read_text()))
    assert config.controller_options is not None
    env = config.controller_options.runtime_env or {}
    assert env["env_vars"] == controller_options()["runtime_env"]["env_vars"]
    middlewares = import_attr(env["env_vars"][CALLBACK_ENV])()
    assert [middleware.cls for middleware in middlewares] == [JsonProxyErrors, SessionKeyMiddleware]
    assert config.applications[0].import_path == "llm_server.scale_out.serve_app:build"
