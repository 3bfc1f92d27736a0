"""A server process chooses its OpenMP wait policy before torch loads, and never overrides the user's.

Each case runs in a fresh interpreter: libgomp reads the policy once, when torch is imported, so
only a process that has not imported torch yet shows what a real server start does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llm_server.engine.wait_policy import SERVER_SPINCOUNT

_BUILD_APP = """
import json, os, sys
from llm_server.api.server import create_app
torch_before = "torch" in sys.modules
create_app(engine_factory=lambda: None)
import torch, logging
from llm_server.engine import threads
records = []
handler = logging.Handler(); handler.emit = records.append
threads.logger.addHandler(handler); threads.logger.setLevel(logging.INFO)
os.getloadavg = lambda: (threads.available_cores() + 3.0, 1.0, 1.0)
threads.configure_threads(2)
print(json.dumps({"torch_before": torch_before, "spincount": os.environ.get("GOMP_SPINCOUNT"),
                  "messages": [r.getMessage() for r in records]}))
"""


def policy_free_env() -> dict[str, str]:
    """This process's environment without an OpenMP wait policy."""
    return {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}


def run_server_start(**env: str) -> dict[str, object]:
    """Build the app in a fresh interpreter with ``env`` on top of a policy-free environment."""
    done = subprocess.run([sys.executable, "-c", _BUILD_APP], env={**policy_free_env(), **env}, capture_output=True,
                          text=True, timeout=300, check=True)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_server_process_spins_less_by_default_and_says_so() -> None:
    result = run_server_start()
    assert result["torch_before"] is False  # the api layer never imports torch, so the setting takes effect
    assert result["spincount"] == SERVER_SPINCOUNT
    messages = result["messages"]
    assert isinstance(messages, list)
    assert any(f"GOMP_SPINCOUNT={SERVER_SPINCOUNT} (the server's default)" in m for m in messages), messages
    # on a busy machine the default still spins too long: the warning names the remedy
    assert any("GOMP_SPINCOUNT=100" in m and "engine.threads: 1" in m for m in messages), messages


@pytest.mark.parametrize(("variable", "value"), [("GOMP_SPINCOUNT", "100"), ("OMP_WAIT_POLICY", "PASSIVE")])
def test_a_wait_policy_the_user_exported_is_kept(variable: str, value: str) -> None:
    result = run_server_start(**{variable: value})
    assert result["spincount"] == (value if variable == "GOMP_SPINCOUNT" else None)
    messages = result["messages"]
    assert isinstance(messages, list)
    assert any(f"wait policy: {variable}={value}" in m for m in messages), messages
    assert not any("(the server's default)" in m or "exceeds" in m for m in messages), messages


def test_nothing_is_set_once_torch_is_loaded() -> None:
    code = ("import os, torch\nfrom llm_server.engine.wait_policy import apply_server_wait_policy\n"
            "print(apply_server_wait_policy(), os.environ.get('GOMP_SPINCOUNT'))")
    done = subprocess.run([sys.executable, "-c", code], env=policy_free_env(), capture_output=True, text=True,
                          timeout=300, check=True)
    assert done.stdout.split() == ["False", "None"]
