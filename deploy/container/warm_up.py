"""Image build step: start the server once in the build stage, as the container will, and stop it.

Two purposes. The venv is installed without byte-code (``pip --no-compile``); this start writes
``__pycache__`` for exactly the modules a start and a first request import, so the runtime image
carries those and not the byte-code of the thousands of modules it never loads (transformers'
other models, most of sympy and torch). And it is a smoke test of the build: the server must get
ready on the converted model without converting it again, answer a chat completion (streamed), and
exit 0 on SIGTERM; the build fails otherwise.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

PORT = 18000
URL = f"http://127.0.0.1:{PORT}"


def wait_ready(server: subprocess.Popen[str], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{URL}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready within {timeout_s:.0f} s")


def stream_chat() -> str:
    body = {"model": "SmolLM2-135M-Instruct", "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello"}]}
    request = urllib.request.Request(f"{URL}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        text = response.read().decode()
    if "data: [DONE]" not in text:
        raise SystemExit(f"the streamed chat completion did not end with [DONE]: {text[-300:]}")
    return text


def main() -> None:
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log_file:
        server = subprocess.Popen(["start_llm_server", "--open-access", "--host", "127.0.0.1", "--port", str(PORT)],
                                  stdout=log_file, stderr=subprocess.STDOUT, text=True)
        try:
            wait_ready(server)
            ready_s = time.perf_counter() - started
            stream_chat()
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        except BaseException:
            log_file.seek(0)
            print(log_file.read(), file=sys.stderr)
            raise
        finally:
            if server.poll() is None:
                server.kill()
        log_file.seek(0)
        log = log_file.read()
    converted = "de-quantizing" in log
    if server.returncode != 0 or converted:
        print(log, file=sys.stderr)
        raise SystemExit(f"warm-up start failed: exit {server.returncode}, converted at start: {converted}")
    print(f"warm-up start: ready in {ready_s:.1f} s, answered, exited 0 on SIGTERM", flush=True)


if __name__ == "__main__":
    main()
