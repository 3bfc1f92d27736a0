"""The deploy files point at what this project builds and serves (no cluster, no container engine).

Nothing here can run Kubernetes, so: the Deployment and Service are validated against Kubernetes'
own schemas (``kubernetes-validate``, strict: unknown fields fail); every manifest under ``deploy/``
is loaded; each names the image ``make image`` tags (``llm-server:<version>``, ``-ray`` for KubeRay);
the ports and probe paths are ones the server really serves (the app's routes, server_config's port);
the grace periods outlast the drain deadline; the RayService's serve config is ``deploy/serve_config.yaml``.
The image's entry point (a POSIX sh script: the key from a secret file, stderr to stdout) is run here
with a stand-in server. The container itself is checked by ``make image-test`` (deploy/image_test.py).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from llm_server.api.server import create_app

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30"
PYPROJECT = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+; the project supports 3.10
VERSION = re.search(r'^version = "([^"]+)"$', PYPROJECT, re.MULTILINE).group(1)  # type: ignore[union-attr]
PACKAGE_SERVER = yaml.safe_load((ROOT / "llm_server" / "yaml_files" / "server_config.yaml").read_text())["server"]


def documents(relative: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / relative).read_text()) if doc]


def by_kind(relative: str, kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in documents(relative) if doc["kind"] == kind]
    return found


@functools.cache
def served_paths() -> frozenset[str]:
    """The paths the app serves, from its OpenAPI document (no model is loaded). create_app() sets the
    server's OpenMP wait policy in os.environ when torch is not imported yet: undone for later tests."""
    saved = dict(os.environ)
    try:
        return frozenset(create_app().openapi()["paths"])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def pod_containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec["containers"])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def test_every_manifest_under_deploy_loads() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {
        "compose.yaml", "serve_config.yaml", "kubernetes/llm-server.yaml", "kuberay/rayservice.yaml"}
    for path in files:
        assert [doc for doc in yaml.safe_load_all(path.read_text()) if doc], path


@pytest.mark.parametrize("kind", ["Deployment", "Service"])
def test_kubernetes_objects_match_the_kubernetes_schema(kind: str) -> None:
    kubernetes_validate.validate(by_kind("kubernetes/llm-server.yaml", kind), K8S_VERSION, strict=True)


def test_the_schema_check_catches_a_wrong_field() -> None:
    """The validation above can fail: a misspelt field and a wrong type are both refused."""
    deployment = by_kind("kubernetes/llm-server.yaml", "Deployment")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment = by_kind("kubernetes/llm-server.yaml", "Deployment")
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_the_deployment_runs_the_image_on_the_served_port_and_paths() -> None:
    deployment = by_kind("kubernetes/llm-server.yaml", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod_containers(pod)
    assert container["image"] == f"llm-server:{VERSION}"
    (port,) = container["ports"]
    assert port["containerPort"] == PACKAGE_SERVER["port"] == 8000
    paths = served_paths()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in paths and get["path"] == "/health"
        assert get["port"] in (port["name"], port["containerPort"])
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_grace_period_outlasts_the_drain_deadline() -> None:
    pod = by_kind("kubernetes/llm-server.yaml", "Deployment")["spec"]["template"]["spec"]
    (container,) = pod_containers(pod)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_s = int(pre_stop[1]) if pre_stop[0] == "sleep" else 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + PACKAGE_SERVER["shutdown_timeout_s"]


def test_the_deployment_mounts_config_and_key_where_its_environment_says() -> None:
    pod = by_kind("kubernetes/llm-server.yaml", "Deployment")["spec"]["template"]["spec"]
    (container,) = pod_containers(pod)
    env = env_of(container)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = mounts[env["LLM_SERVER_CONFIG_DIR"]]
    assert config["readOnly"] is True and "configMap" in volumes[config["name"]]
    key_folder, key_name = env["CHAT_SERVER_API_KEY_FILE"].rsplit("/", 1)
    secret = volumes[mounts[key_folder]["name"]]["secret"]
    assert secret["secretName"] == "llm-server-api-key" and key_name == "api-key"
    assert "CHAT_SERVER_API_KEY" not in env  # the key itself never sits in the pod spec


def test_the_service_targets_the_deployment_pods_and_port() -> None:
    deployment = by_kind("kubernetes/llm-server.yaml", "Deployment")
    service = by_kind("kubernetes/llm-server.yaml", "Service")
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = pod_containers(deployment["spec"]["template"]["spec"])
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in (container["ports"][0]["name"], container["ports"][0]["containerPort"])


def test_compose_runs_the_image_with_healthcheck_config_and_secret() -> None:
    (compose,) = documents("compose.yaml")
    service = compose["services"]["llm-server"]
    assert service["image"] == f"llm-server:{VERSION}"
    assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == ROOT / "Containerfile"
    assert service["ports"] == [f"{PACKAGE_SERVER['port']}:8000"]
    assert "http://127.0.0.1:8000/health" in " ".join(service["healthcheck"]["test"])
    source, target, mode = service["volumes"][0].split(":")
    assert (DEPLOY / source).is_dir() and target == service["environment"]["LLM_SERVER_CONFIG_DIR"] and mode == "ro"
    (secret,) = service["secrets"]
    assert service["environment"]["CHAT_SERVER_API_KEY_FILE"] == f"/run/secrets/{secret}"
    assert secret in compose["secrets"]
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace and int(grace.group(1)) > PACKAGE_SERVER["shutdown_timeout_s"]


def test_the_rayservice_runs_the_ray_image_and_the_serve_config_that_exists() -> None:
    (service,) = documents("kuberay/rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    (app,) = serve_config["applications"]
    module, function = app["import_path"].split(":")
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert re.search(rf"^def {function}\(", source, re.MULTILINE), app["import_path"]
    assert serve_config["http_options"]["port"] == 8000
    cluster = service["spec"]["rayClusterConfig"]
    assert re.search(rf'^ray = \["ray\[serve\]=={re.escape(cluster["rayVersion"])}"\]$', PYPROJECT, re.MULTILINE)
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod_containers(pod):
            assert container["image"] == f"llm-server:{VERSION}-ray"
            assert env_of(container)["CHAT_SERVER_API_KEY"] == {
                "secretKeyRef": {"name": "llm-server-api-key", "key": "api-key"}}


def test_the_containerfile_serves_what_the_manifests_expect() -> None:
    text = (ROOT / "Containerfile").read_text()
    assert re.search(r"^EXPOSE 8000$", text, re.MULTILINE)
    assert "http://127.0.0.1:8000/health" in text and "/health" in served_paths()
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    makefile_torch = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert makefile_torch and f"ARG TORCH_SPEC={makefile_torch.group(1)}\n" in text


# ---------------------------------------------------------------- the image's entry point (sh only)

ENTRYPOINT = DEPLOY / "container" / "entrypoint.sh"


@pytest.fixture
def entrypoint(tmp_path: Path) -> Any:
    """Runs the image's entry point with a stand-in start_llm_server that prints what it got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "start_llm_server"
    fake.write_text('#!/bin/sh\necho "key=[$CHAT_SERVER_API_KEY] file=[${CHAT_SERVER_API_KEY_FILE:-}] args=[$*]"\n'
                    'echo "a log line" >&2\n')
    fake.chmod(0o755)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", **env}
        return subprocess.run(["sh", str(ENTRYPOINT), *args], env=environment, capture_output=True, text=True,
                              timeout=30)

    return run


def test_entrypoint_reads_the_keys_from_the_secret_file(entrypoint: Any, tmp_path: Path) -> None:
    keys = tmp_path / "api_key"
    keys.write_text("key-one\r\nkey-two\n\n")
    result = entrypoint("--open-access", CHAT_SERVER_API_KEY_FILE=str(keys))
    assert result.returncode == 0, result.stderr
    assert "key=[key-one,key-two] file=[] args=[--open-access]" in result.stdout
    assert "a log line" in result.stdout and result.stderr == ""  # the server's stderr log goes to stdout


@pytest.mark.parametrize(("content", "extra", "message"), [
    ("", {}, "is empty"),
    (None, {}, "cannot read"),
    ("k", {"CHAT_SERVER_API_KEY": "other"}, "not both"),
])
def test_entrypoint_refuses_a_bad_key_file(entrypoint: Any, tmp_path: Path, content: str | None,
                                           extra: dict[str, str], message: str) -> None:
    keys = tmp_path / "api_key"
    if content is not None:
        keys.write_text(content)
    result = entrypoint(CHAT_SERVER_API_KEY_FILE=str(keys), **extra)
    assert result.returncode == 2 and message in result.stderr and "key=" not in result.stdout


def test_entrypoint_runs_another_command_when_given_one(entrypoint: Any) -> None:
    result = entrypoint("echo", "hello")
    assert result.returncode == 0 and result.stdout == "hello\n"
