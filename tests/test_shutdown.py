"""Graceful shutdown: draining state in-process, and SIGTERM on a real server process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_server.api.plumbing.drain import SHUTDOWN_CUT_REASON, drain_state
from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, build_app, free_port, live_server, wait_until
from tests.shutdown_server import WORDS

ROOT = Path(__file__).resolve().parent.parent
MODEL = "scripted-model"
HEADERS = {"X-API-Key": API_KEY}
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "stream": True}


# --- in process: what draining looks like ---------------------------------------------------
def test_draining_server_fails_health_and_refuses_new_work(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, reply="fine")
    app = build_app(engine)
    with live_server(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        drain_state(app).begin()

        health = httpx.get(f"{url}/health")
        assert health.status_code == 503
        assert health.json()["status"] == "draining"

        refused = httpx.post(f"{url}/v1/chat/completions", json=BODY, headers=HEADERS)
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert refused.headers["x-request-id"]

        assert httpx.get(f"{url}/metrics").status_code == 200  # still scrapeable
        assert engine.requests == []


@pytest.mark.parametrize("streamed", [True, False])
def test_answers_cut_at_the_shutdown_deadline_end_with_an_error(tokenizer: Any, streamed: bool) -> None:
    engine = ScriptedEngine(tokenizer, reply=" ".join(["word"] * 1000), delay_s=0.02)
    app = build_app(engine)
    with live_server(app) as url:
        spec_body = {"prompt": "Count", "max_new_tokens": 1000}
        v1_body = {**BODY, "max_tokens": 1000, "stream": streamed}
        cutter = threading.Timer(1.0, drain_state(app).cut_open_streams)
        cutter.start()
        if streamed:
            spec = httpx.post(f"{url}/chat/stream", json=spec_body, headers=HEADERS, timeout=60)
            assert spec.text.startswith("word") and spec.text.endswith("[[ERROR]] " + SHUTDOWN_CUT_REASON)
            cutter = threading.Timer(1.0, drain_state(app).cut_open_streams)
            cutter.start()
            events = httpx.post(f"{url}/v1/chat/completions", json=v1_body, headers=HEADERS, timeout=60).text
            last = json.loads(events.strip().split("\n\n")[-1].removeprefix("data: "))
            assert last["error"]["code"] == "server_shutting_down"
        else:
            spec = httpx.post(f"{url}/chat/blocking", json=spec_body, headers=HEADERS, timeout=60)
            assert spec.status_code == 503 and spec.json()["error"]["code"] == "server_shutting_down"
            assert int(spec.headers["retry-after"]) >= 1
        assert wait_until(lambda: engine.stats().running == 0)


# --- a real process and a real SIGTERM ------------------------------------------------------
class ServerProcess:
    def __init__(self, timeout_s: float, log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.shutdown_server", str(self.port), str(timeout_s), *extra],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, self.log()
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(ready, timeout_s=60, interval_s=0.1), self.log()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(timeout_s: float, *extra: str) -> ServerProcess:
        server = ServerProcess(timeout_s, tmp_path / f"server{len(started)}.log", *extra)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


class StreamReader(threading.Thread):
    """Reads one SSE chat stream to its end in the background."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[str] = []
        self.first = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=BODY, headers=HEADERS,
                              timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line.removeprefix("data: "))
                        if any('"content":"word' in e for e in self.events):
                            self.first.set()
        except BaseException as exc:  # noqa: BLE001 - a cut connection (or anything else) fails the test thread's assert
            self.error = exc
        finally:
            self.first.set()

    def text(self) -> str:
        parts = []
        for event in self.events:
            if event != "[DONE]":
                parts.extend(c["delta"].get("content") or "" for c in json.loads(event).get("choices", []))
        return "".join(parts)


def refuses_new_requests(url: str) -> bool:
    try:
        response = httpx.get(f"{url}/health", timeout=2)
    except httpx.TransportError:
        return True  # connection refused: the listener is closed
    return response.status_code == 503


def streaming_server(spawn: Any, timeout_s: float, *extra: str) -> tuple[Any, StreamReader]:
    """A spawned server with a stream running on it (its first event received)."""
    server = spawn(timeout_s, *extra)
    reader = StreamReader(server.url)
    reader.start()
    assert reader.first.wait(30), server.log()
    return server, reader


def test_sigterm_lets_the_running_request_finish_then_exits_0(spawn: Any) -> None:
    server, reader = streaming_server(spawn, timeout_s=30)

    server.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: refuses_new_requests(server.url), timeout_s=10), server.log()
    reader.join(timeout=60)

    assert reader.error is None, (reader.error, server.log())
    assert reader.events[-1] == "[DONE]"
    assert reader.text() == " ".join(f"word{i}" for i in range(WORDS))
    assert server.proc.wait(timeout=30) == 0, server.log()
    assert "draining" in server.log()


def test_sigterm_cuts_requests_that_outlive_the_shutdown_timeout(spawn: Any) -> None:
    server, reader = streaming_server(spawn, timeout_s=1)

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0, server.log()
    reader.join(timeout=30)
    assert "[DONE]" not in reader.events  # cut short: 40 words take 4 s, the timeout is 1 s
    last = json.loads(reader.events[-1])  # ... and said so: never a truncated body that looks complete
    assert last["error"]["code"] == "server_shutting_down", (reader.events, server.log())
    assert "cutting 1 running request(s) short" in server.log()


def test_after_sigterm_new_connections_are_refused(spawn: Any) -> None:
    """What draining looks like from outside: the listener closes at once (a load balancer sees
    the port closed and fails over), while the running answer goes on."""
    server, reader = streaming_server(spawn, timeout_s=30)
    server.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: refuses_new_requests(server.url), timeout_s=10), server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)
    reader.join(timeout=60)
    assert reader.events[-1] == "[DONE]"
    assert server.proc.wait(timeout=30) == 0, server.log()


@pytest.mark.integration
def test_start_llm_server_drains_on_sigterm(tmp_path: Path) -> None:
    """The real console script and embedded model: SIGTERM mid-answer, the answer completes, exit 0."""
    import os

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = {**os.environ, "CHAT_SERVER_API_KEY": API_KEY}
    script = Path(sys.executable).parent / "start_llm_server"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(script), "--host", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            def ready() -> bool:
                assert proc.poll() is None, log_path.read_text()
                try:
                    return httpx.get(f"{url}/health", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False

            assert wait_until(ready, timeout_s=120, interval_s=0.2), log_path.read_text()
            model = httpx.get(f"{url}/v1/models", headers=HEADERS).json()["data"][0]["id"]
            body = {"model": model, "stream": True, "max_tokens": 48, "temperature": 0,
                    "messages": [{"role": "user", "content": "Count from 1 to 50, separated by commas."}]}
            events: list[str] = []
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=HEADERS,
                              timeout=120) as resp:
                lines = resp.iter_lines()
                for line in lines:
                    if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                        events.append(line)
                        break
                proc.send_signal(signal.SIGTERM)
                events.extend(line for line in lines if line.startswith("data: "))
            assert events[-1] == "data: [DONE]"
            finish = json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
            assert finish in ("stop", "length")
            assert proc.wait(timeout=60) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert "draining" in log_path.read_text()


# --- issue 24 (D9): a second signal during the drain never deadlocks, it exits at once -----------
def test_the_signal_handler_takes_no_lock(tokenizer: Any) -> None:
    """A signal may arrive while the main thread holds the drain lock (that was the deadlock):
    the handler must not wait for it."""
    import uvicorn

    from llm_server.api.ops.shutdown import GracefulServer

    app = build_app(ScriptedEngine(tokenizer, reply="fine"))
    server = GracefulServer(uvicorn.Config(app), app)
    state = drain_state(app)
    with state._lock:  # held, as by a begin() that the signal interrupted
        handler = threading.Thread(target=lambda: [server.handle_exit(signal.SIGTERM, None) for _ in range(2)],
                                   daemon=True)
        handler.start()
        handler.join(timeout=10)
        assert not handler.is_alive(), "the signal handler blocked on the drain lock"
    assert server.should_exit and server.force_exit


def assert_forced_exit_cut_the_stream(server: Any, reader: StreamReader) -> None:
    assert server.proc.wait(timeout=20) == 0, server.log()  # the stream alone would run 4 s more
    reader.join(timeout=30)
    assert "[DONE]" not in reader.events, server.log()
    last = json.loads(reader.events[-1])  # cut, and told so in-band
    assert last["error"]["code"] == "server_shutting_down", (reader.events, server.log())
    assert "second stop signal: exiting now" in server.log()


def test_a_second_signal_inside_the_first_handler_exits_at_once(spawn: Any) -> None:
    server, reader = streaming_server(spawn, 30, "resignal")
    server.proc.send_signal(signal.SIGTERM)  # its handler raises a second SIGTERM inside itself
    assert_forced_exit_cut_the_stream(server, reader)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_during_the_drain_exits_at_once(spawn: Any, sig: signal.Signals) -> None:
    """A double Ctrl+C, or ``kill -- -PGID; kill PID`` seen after the drain began."""
    server, reader = streaming_server(spawn, 30)
    server.proc.send_signal(sig)
    assert wait_until(lambda: "draining" in server.log(), timeout_s=10), server.log()
    server.proc.send_signal(sig)
    assert_forced_exit_cut_the_stream(server, reader)


def test_a_burst_of_sigterms_exits(spawn: Any) -> None:
    """40 SIGTERMs back to back (the kernel may merge some): the process exits, and the running
    answer either completed or ended with the in-band error, never silently."""
    server, reader = streaming_server(spawn, 30)
    for _ in range(40):
        server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0, server.log()
    reader.join(timeout=30)
    assert reader.events[-1] == "[DONE]" or json.loads(reader.events[-1])["error"]["code"] == "server_shutting_down"
