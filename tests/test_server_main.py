"""``start_llm_server`` / ``main()`` and ``create_app``: flags, config folder, placeholders, keys at
start, the model loading in the lifespan (never at import), and, with the real model, the spec's
examples against the real console script (what ``make serve`` runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from llm_server.api import server as server_module
from llm_server.api.plumbing.auth import OpenAccessKeyStore, StaticKeyStore
from llm_server.api.settings import ServerSettings
from llm_server.helper_functionality.config_models import ModelSection
from llm_server.helper_functionality.yaml_loading import CONFIG_DIR_ENV
from tests.spec_harness import free_port, serving

SCRIPT = Path(sys.executable).with_name("start_llm_server")


@pytest.fixture(autouse=True)
def _clean_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """main() may point the loaders at another folder: undo it after each test."""
    from llm_server.helper_functionality import yaml_loading

    for name in ("CHAT_SERVER_HOST", "CHAT_SERVER_API_KEY", "KEYVAULT_URL", "API_KEY_SECRET_NAME", CONFIG_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    yield
    yaml_loading.set_config_dir(None)  # also restores $LLM_SERVER_CONFIG_DIR


class Launch:
    """What main() handed to create_app / run_server (no server is started)."""

    settings: ServerSettings
    key_store: Any
    run: dict[str, Any]


@pytest.fixture
def launch(monkeypatch: pytest.MonkeyPatch) -> Launch:
    seen = Launch()
    real_create_app = server_module.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        seen.settings = kwargs["settings"]
        seen.key_store = kwargs["key_store"]
        return real_create_app(*args, **kwargs)

    def run_server(app: Any, **kwargs: Any) -> None:
        seen.run = kwargs

    monkeypatch.setattr(server_module, "create_app", create_app)
    monkeypatch.setattr(server_module, "run_server", run_server)
    monkeypatch.setattr(server_module, "configure_logging", lambda *a, **k: None)
    return seen


def test_defaults_come_from_server_config(launch: Launch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_SERVER_API_KEY", "k-one,k-two")
    server_module.main([])
    assert launch.run["host"] == "0.0.0.0" and launch.run["port"] == 8000
    assert launch.run["shutdown_timeout_s"] == 30
    assert launch.key_store.matches("k-two") and not launch.key_store.matches("k-three")


def test_host_placeholder_and_flags(launch: Launch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_SERVER_HOST", "127.0.0.2")
    monkeypatch.setenv("CHAT_SERVER_API_KEY", "k")
    server_module.main([])
    assert launch.run["host"] == "127.0.0.2"
    server_module.main(["--host", "127.0.0.1", "--port", "8123"])
    assert (launch.run["host"], launch.run["port"]) == ("127.0.0.1", 8123)


def test_config_dir_flag(launch: Launch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "server_config.yaml").write_text(
        'server:\n  host: "127.0.0.3"\n  port: 9123\n  api_key: "MY_OWN_KEY_VAR"\n'
        "  limits:\n    max_new_tokens: 77\n    max_body_bytes: 5000\n"
    )
    prompts = "system_prompts:\n  assistant: Be terse.\n  critic: Criticize.\n"
    (tmp_path / "system_prompt_config.yaml").write_text(prompts)
    monkeypatch.setenv("MY_OWN_KEY_VAR", "from-my-var")
    server_module.main(["--config-dir", str(tmp_path)])
    assert (launch.run["host"], launch.run["port"]) == ("127.0.0.3", 9123)
    assert launch.settings.max_new_tokens_limit == 77 and launch.settings.max_body_bytes == 5000
    assert dict(launch.settings.system_prompts) == {"assistant": "Be terse.", "critic": "Criticize."}
    assert launch.settings.model.id  # model_config.yaml not in the folder: the package default
    assert launch.key_store.matches("from-my-var")


def test_open_access_flag(launch: Launch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_SERVER_API_KEY", "k")
    server_module.main(["--open-access"])
    assert isinstance(launch.key_store, OpenAccessKeyStore)


def test_no_key_configured_generates_and_prints_one(launch: Launch, capsys: pytest.CaptureFixture[str]) -> None:
    server_module.main([])
    out = capsys.readouterr().out
    assert isinstance(launch.key_store, StaticKeyStore)
    keys = re.findall(r"llm-[A-Za-z0-9_-]+", out)
    assert len(keys) == 1 and launch.key_store.matches(keys[0])


def test_missing_config_dir_is_a_clear_error(
    launch: Launch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        server_module.main(["--config-dir", str(tmp_path / "nope")])
    assert info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_broken_config_is_a_clear_error(launch: Launch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "server_config.yaml").write_text("server:\n  port: eighty\n")
    with pytest.raises(SystemExit) as info:
        server_module.main(["--config-dir", str(tmp_path)])
    assert info.value.code == 2
    assert "server.port" in capsys.readouterr().err


def test_help_runs_without_loading_anything() -> None:
    done = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for flag in ("--host", "--port", "--config-dir", "--open-access"):
        assert flag in done.stdout


def test_the_api_package_never_imports_torch() -> None:
    code = (
        "import sys; import llm_server.api.server, llm_server.api.protocols.spec_chat, llm_server.serving.service; "
        "app = llm_server.api.server.create_app(); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CHAT_SERVER_API_KEY": "k"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize(("compile_setting", "device", "noted"),
                         [("auto", "cuda", True), ("auto", "cpu", False), (True, "cpu", True), (False, "cuda", False)])
def test_the_engine_loader_notes_python_api_only_options(
    compile_setting: Any, device: str, noted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    from llm_server.engine.loader import _note_python_api_only_options

    with caplog.at_level("INFO", logger="llm_server.engine.loader"):
        _note_python_api_only_options({"compile": compile_setting, "attn_implementation": "sdpa"}, torch.device(device))
    assert ("apply to model.generate" in caplog.text) is noted


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # uvicorn's failed start
def test_the_model_loads_in_the_lifespan_not_before(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def initialize(**kwargs: Any) -> Any:
        calls.append(kwargs)
        raise RuntimeError("no model in this test")

    monkeypatch.setattr("llm_server.helper_functionality.model_loading.initialize", initialize)
    app = server_module.create_app(settings=ServerSettings(api_keys=("k",),
                                                           model=ModelSection(id="some/model", device="cpu")))
    assert calls == []
    with pytest.raises(RuntimeError, match="failed to start"):
        with serving(app):
            pass
    assert calls == [{"device": "cpu", "model_id": "some/model"}]


# --- the real thing -----------------------------------------------------------------------------
def _wait_healthy(url: str, process: subprocess.Popen[str], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise AssertionError("the server did not become healthy")


@pytest.mark.integration
def test_make_serve_and_the_spec_examples_on_the_embedded_model(tmp_path: Path) -> None:
    """start_llm_server --host 127.0.0.1 --port P, no key configured: the printed key works with
    the spec's examples (small default budget from a config folder, to keep CPU time low)."""
    (tmp_path / "model_config.yaml").write_text(
        'model:\n  id: "embedded:SmolLM2-135M-Instruct"\n  device: "cpu"\n  served_name: "SmolLM2-135M-Instruct"\n'
        "  parameters:\n    max_new_tokens: 12\n    temperature: 0.7\n    top_p: 0.9\n    do_sample: true\n"
        "  optimizations:\n    dtype: float32\n    compile: false\n"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("CHAT_SERVER_API_KEY", "KEYVAULT_URL")}
    stdout = tmp_path / "stdout.txt"
    with stdout.open("w") as out:
        process = subprocess.Popen(
            [str(SCRIPT), "--host", "127.0.0.1", "--port", str(port), "--config-dir", str(tmp_path)],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
        )
        try:
            _wait_healthy(url, process)
            keys = re.findall(r"^\s+(llm-[A-Za-z0-9_-]+)\s*$", stdout.read_text(), flags=re.M)
            assert len(keys) == 1
            key = keys[0]

            # Basic API Usage
            headers = {"X-API-Key": key}
            payload = {"prompt": "Explain how REST APIs work", "history": [], "improvement": False,
                       "intermediate_steps": False}
            response = requests.post(f"{url}/chat/blocking", json=payload, headers=headers)
            result = response.json()
            assert isinstance(result["reply"], str) and result["reply"].strip()

            # Streaming Responses (improvement + intermediate steps: five to nine short passes)
            payload = {"prompt": "Write a Python function to calculate fibonacci numbers", "improvement": True,
                       "intermediate_steps": True}
            response = requests.post(f"{url}/chat/stream", json=payload, headers=headers, stream=True)
            chunks = [c for c in response.iter_content(chunk_size=None, decode_unicode=True)]
            assert chunks[-1] == "[[END]]"
            text = "".join(chunks)
            headings = ["### Draft answer", "### Review 1", "### Revision 1", "### Review 2", "### Final answer"]
            # sampled: stage 2 runs beside stage 1 on the real engine; the sections keep the spec's order
            assert [text.index(h) for h in headings] == sorted(text.index(h) for h in headings)

            # Health Check and Testing
            assert requests.get(f"{url}/ping?x_api_key={key}").status_code == 200
            assert requests.get(f"{url}/chat/blocking?prompt=Hello&x_api_key={key}").json()["reply"].strip()
            assert requests.get(f"{url}/ping").status_code == 401
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert process.returncode == 0, stdout.read_text()[-3000:]
    assert key not in stdout.read_text().replace(f"    {key}\n", "", 1)  # printed once, never logged


def test_main_called_from_python_ignores_the_host_programs_arguments(
    launch: Launch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spec's ``from llm_server.api.server import main; main()`` inside Jupyter (argv
    ``-f kernel.json``) or another script must start with the config, not parse their flags."""
    monkeypatch.setenv("CHAT_SERVER_API_KEY", "k-one")
    monkeypatch.setattr(sys, "argv", ["/usr/lib/ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"])
    server_module.main()
    assert launch.run["port"] == 8000


def test_the_console_script_parses_its_own_flags(launch: Launch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_SERVER_API_KEY", "k-one")
    monkeypatch.setattr(sys, "argv", ["/venv/bin/start_llm_server", "--port", "9123"])
    server_module.main()
    assert launch.run["port"] == 9123
    monkeypatch.setattr(sys, "argv", ["/venv/bin/start_llm_server", "--bogus"])
    with pytest.raises(SystemExit):
        server_module.main()
