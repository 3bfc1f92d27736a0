"""``make image-test``: check the built image from outside, as a user would (docs/deploy.md).

Run by ``deploy/container/image_test.sh`` (which picks the engine and builds the image) with a
small client venv: only the ``openai`` SDK and ``httpx``, no torch. One container is started with a
config folder mounted read-only (``LLM_SERVER_CONFIG_DIR``; it renames the served model and sets a
2 s shutdown timeout) and the API key in a mounted secret file (``CHAT_SERVER_API_KEY_FILE``).
Checks, in order: ready on ``/health`` with no model conversion at start; logs on stdout; the
HEALTHCHECK; the server process is not root; the key is not in ``inspect``; the mounted config is
honoured and read-only; the ``openai`` SDK's chat completion, streamed and not; ``/chat/blocking``
with and without the key; then SIGTERM (``<engine> stop``) with streams running: a stream cut by the
shutdown deadline ends with ``[[ERROR]]``, and the container exits 0 within the grace period.
Prints the image's size by layer group, the build time and the time from ``run`` to ready, and
writes them to ``build/image-test-result.json``. Exits 1 with the reason on the first failed check.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "image-test-model"
SHUTDOWN_TIMEOUT_S = 2
GRACE_S = 20
READY_TIMEOUT_S = 180
CONFIG_IN_CONTAINER = "/etc/llm_server"
KEY_IN_CONTAINER = "/run/secrets/llm_server_api_key"
LONG_PROMPT = "Write a very long story, at least 800 words, about a lighthouse keeper and a storm."


class CheckFailed(Exception):
    """A check of the image failed; the message says which and why."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)
    print(f"ok: {message}", flush=True)


def run(*args: str, check_rc: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check_rc and result.returncode != 0:
        raise CheckFailed(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(folder: Path) -> None:
    """The package's YAML files with two visible changes: the served name and the shutdown timeout."""
    folder.chmod(0o755)
    for source in (ROOT / "llm_server" / "yaml_files").glob("*.yaml"):
        text = source.read_text()
        if source.name == "model_config.yaml":
            text = replace_once(text, 'served_name: "SmolLM2-135M-Instruct"', f'served_name: "{SERVED_NAME}"')
        if source.name == "server_config.yaml":
            text = replace_once(text, "shutdown_timeout_s: 30", f"shutdown_timeout_s: {SHUTDOWN_TIMEOUT_S}")
        (folder / source.name).write_text(text)
        (folder / source.name).chmod(0o644)


def replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise CheckFailed(f"the package's YAML no longer holds {old!r}: update deploy/image_test.py")
    return text.replace(old, new)


class Container:
    """One container of the image, driven through the engine's CLI."""

    def __init__(self, engine: str, image: str, port: int) -> None:
        self.engine, self.image, self.port = engine, image, port
        self.name = f"llm-server-image-test-{port}"
        self.url = f"http://127.0.0.1:{port}"

    def start(self, config: Path, key_file: Path) -> float:
        """Start it with the config and key mounted; seconds from ``run`` to ``/health`` 200."""
        started = time.perf_counter()
        run(self.engine, "run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:8000",
            "-v", f"{config}:{CONFIG_IN_CONTAINER}:ro", "-e", f"LLM_SERVER_CONFIG_DIR={CONFIG_IN_CONTAINER}",
            "-v", f"{key_file}:{KEY_IN_CONTAINER}:ro", "-e", f"CHAT_SERVER_API_KEY_FILE={KEY_IN_CONTAINER}",
            self.image)
        while time.perf_counter() - started < READY_TIMEOUT_S:
            if self.inspect("{{.State.Running}}") != "true":
                raise CheckFailed(f"the container stopped before it was ready:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise CheckFailed(f"/health not 200 within {READY_TIMEOUT_S} s:\n{self.logs()}")

    def inspect(self, template: str) -> str:
        return run(self.engine, "inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        result = run(self.engine, "logs", self.name, check_rc=False)
        return result.stdout + result.stderr

    def stdout_log(self) -> str:
        return run(self.engine, "logs", self.name).stdout

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return run(self.engine, "exec", self.name, *command, check_rc=False)

    def healthcheck_passes(self) -> bool:
        if self.engine == "podman":  # podman runs HEALTHCHECKs from systemd timers; run it once here
            return run(self.engine, "healthcheck", "run", self.name, check_rc=False).returncode == 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.inspect("{{.State.Health.Status}}") == "healthy":
                return True
            time.sleep(1)
        return False

    def remove(self) -> None:
        run(self.engine, "rm", "-f", self.name, check_rc=False)


def check_container_basics(box: Container, key: str) -> None:
    log = box.stdout_log()
    check("de-quantizing" not in box.logs(), "no model conversion at start (the converted model is in the image)")
    check("loaded on" in log, "the server logs to stdout (the model-loaded line is in the stdout log)")
    check("fused CPU kernels: /opt/llm_server/cpu_kernels.so" in log,
          "the runner uses the image's portable build of the fused CPU kernels (no compiler in the image)")
    check(box.healthcheck_passes(), "the image's HEALTHCHECK passes")
    status = box.exec("cat", "/proc/1/status").stdout
    uid = next((line.split()[1] for line in status.splitlines() if line.startswith("Uid:")), "?")
    cmdline = box.exec("cat", "/proc/1/cmdline").stdout.replace("\0", " ")
    check(uid not in ("0", "?") and "start_llm_server" in cmdline,
          f"the server (PID 1: {cmdline.strip()}) runs as uid {uid}, not root")
    check(key not in run(box.engine, "inspect", box.name).stdout, "the API key does not show in inspect")
    probe = box.exec("touch", f"{CONFIG_IN_CONTAINER}/probe")
    check(probe.returncode != 0, f"the mounted config folder is read-only in the container ({probe.stderr.strip()})")


def check_openai_sdk(box: Container, key: str) -> None:
    client = OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=120)
    models = [model.id for model in client.models.list()]
    check(models == [SERVED_NAME], f"the read-only mounted config is honoured: /v1/models lists {models}")
    messages: Any = [{"role": "user", "content": "Say hello in five words."}]
    reply = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=16, temperature=0)
    content = reply.choices[0].message.content or ""
    check(bool(content.strip()) and reply.usage is not None and reply.usage.completion_tokens > 0,
          f"openai SDK chat completion: {content.strip()[:60]!r}")
    parts, finish = [], None
    for chunk in client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=16, stream=True):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    check(bool("".join(parts).strip()) and finish in ("stop", "length"),
          f"openai SDK streamed chat completion: {''.join(parts).strip()[:60]!r} ({len(parts)} chunks, {finish})")


def check_chat_blocking(box: Container, key: str) -> None:
    body = {"prompt": "Name a colour.", "history": [], "improvement": False, "intermediate_steps": False,
            "max_new_tokens": 12}
    response = httpx.post(f"{box.url}/chat/blocking", json=body, headers={"X-API-Key": key}, timeout=120)
    check(response.status_code == 200 and isinstance(response.json().get("reply"), str),
          f"/chat/blocking with the key from the mounted secret file: {response.json().get('reply', '')[:40]!r}")
    for headers in ({}, {"X-API-Key": "not-the-key"}):
        refused = httpx.post(f"{box.url}/chat/blocking", json=body, headers=headers, timeout=30)
        check(refused.status_code == 401, f"/chat/blocking with {'a wrong' if headers else 'no'} key: 401")


class ChatStream(threading.Thread):
    """One /chat/stream read to its end in the background."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.text = ""
        self.started = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"prompt": LONG_PROMPT, "history": [], "improvement": False, "intermediate_steps": False,
                "max_new_tokens": 1000}
        try:
            with httpx.stream("POST", f"{self.url}/chat/stream", json=body, headers={"X-API-Key": self.key},
                              timeout=120) as response:
                for piece in response.iter_text():
                    self.text += piece
                    self.started.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the check below
            self.error = exc
        finally:
            self.started.set()


def check_sigterm_drain(box: Container, key: str) -> float:
    streams = [ChatStream(box.url, key) for _ in range(3)]
    for stream in streams:
        stream.start()
    check(all(stream.started.wait(60) and stream.text for stream in streams), "3 streams are running")
    started = time.perf_counter()
    run(box.engine, "stop", "-t", str(GRACE_S), box.name, timeout=GRACE_S + 30)
    stop_s = time.perf_counter() - started
    for stream in streams:
        stream.join(timeout=30)
    endings = [stream.text.rstrip()[-120:] for stream in streams]
    check(all(stream.error is None for stream in streams), f"the streams closed cleanly: {[s.error for s in streams]}")
    check(all(text.endswith("[[END]]") or "[[ERROR]]" in text for text in endings),
          "every stream ended with [[END]] or [[ERROR]], none silently")
    check(any("[[ERROR]]" in text for text in endings),
          f"a stream cut by the {SHUTDOWN_TIMEOUT_S} s shutdown deadline got [[ERROR]]: "
          f"{next((t[t.find('[[ERROR]]'):] for t in endings if '[[ERROR]]' in t), endings)}")
    code = box.inspect("{{.State.ExitCode}}")
    check(code == "0" and stop_s < GRACE_S,
          f"SIGTERM: the container exited {code} in {stop_s:.1f} s (grace period {GRACE_S} s)")
    return stop_s


def history(engine: str, image: str) -> list[tuple[int, str]]:
    """(bytes, created by) per layer, oldest first (podman: a JSON list; docker: a JSON object a line)."""
    if engine == "podman":
        rows = json.loads(run(engine, "history", "--no-trunc", "--format", "json", image).stdout)
    else:
        text = run(engine, "history", "--no-trunc", "--human=false", "--format", "{{json .}}", image).stdout
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [(int(row.get("size", row.get("Size", 0)) or 0), row.get("CreatedBy", "")) for row in rows][::-1]


def layer_groups(engine: str, image: str) -> dict[str, int]:
    """Bytes per layer group: base, torch, the rest of the venv, the model, other (user, entrypoint)."""
    base = run(engine, "image", "inspect", "--format",
               '{{index .Config.Labels "org.opencontainers.image.base.name"}}', image).stdout.strip()
    base_count = len(history(engine, base)) if base else 0
    groups = {"base": 0, "torch": 0, "venv": 0, "model": 0, "other": 0}
    venv_copies = 0
    for index, (size, created_by) in enumerate(history(engine, image)):
        if index < base_count:
            groups["base"] += size
        elif "COPY" in created_by and "/opt/venv/" in created_by:
            groups["torch" if venv_copies == 0 else "venv"] += size
            venv_copies += 1
        elif "COPY" in created_by and "/opt/llm_server/" in created_by:
            groups["model"] += size
        else:
            groups["other"] += size
    return groups


def report(engine: str, image: str, build_s: float | None, ready_s: float, stop_s: float) -> None:
    size = int(run(engine, "image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    groups = layer_groups(engine, image)
    result = {"engine": engine, "image": image, "size_bytes": size, "layer_groups_bytes": groups,
              "build_s": build_s, "run_to_ready_s": round(ready_s, 2), "sigterm_to_exit_s": round(stop_s, 2)}
    print("\n== image test passed")
    print(f"image {image}: {size / 1e9:.2f} GB uncompressed ({size:,} bytes)")
    print("  " + ", ".join(f"{name} {value / 1e6:.0f} MB" for name, value in groups.items()))
    built = f"{build_s:.0f} s" if build_s is not None else "n/a"
    print(f"build: {built}; run to ready: {ready_s:.1f} s; "
          f"SIGTERM to exit 0: {stop_s:.1f} s")
    out = ROOT / "build" / "image-test-result.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, choices=["docker", "podman"])
    parser.add_argument("--image", required=True)
    parser.add_argument("--build-seconds", type=float, default=None)
    args = parser.parse_args()
    key = "image-test-" + secrets.token_urlsafe(16)
    box = Container(args.engine, args.image, free_port())
    workdir = Path(tempfile.mkdtemp(prefix="llm-server-image-test-"))
    try:
        write_config(workdir / "config" if (workdir / "config").mkdir() is None else workdir)
        (workdir / "api_key").write_text(key + "\n")
        (workdir / "api_key").chmod(0o644)
        workdir.chmod(0o755)
        ready_s = box.start(workdir / "config", workdir / "api_key")
        check(True, f"{args.image} ready on /health {ready_s:.1f} s after '{args.engine} run'")
        check_container_basics(box, key)
        check_openai_sdk(box, key)
        check_chat_blocking(box, key)
        stop_s = check_sigterm_drain(box, key)
        report(args.engine, args.image, args.build_seconds, ready_s, stop_s)
        return 0
    except CheckFailed as exc:
        print(f"\nFAILED: {exc}\n--- container log (tail) ---\n{box.logs()[-4000:]}", file=sys.stderr)
        return 1
    finally:
        box.remove()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
