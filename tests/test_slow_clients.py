"""Issue 24 D5: slowloris clients cannot hold connections (request-head deadline), and a real
client is answered meanwhile. Loopback only, 1,000 connections, a 2 s configured deadline."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from llm_server.api.ops.shutdown import GracefulServer
from llm_server.api.plumbing.slow_clients import http_protocol
from tests.fakes import ScriptedEngine
from tests.openai_harness import build_app, wait_for_model

HEAD_TIMEOUT_S = 2.0
CONNECTIONS = 1000


@pytest.fixture(scope="module")
def server_port(tokenizer: Any) -> Iterator[int]:
    """The app behind the protocol run_server uses, with a short head deadline."""
    app = build_app(ScriptedEngine(tokenizer, reply="fine"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            http=http_protocol(HEAD_TIMEOUT_S), backlog=4096)
    server = GracefulServer(config, app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.02)
    wait_for_model(app)
    yield int(sock.getsockname()[1])
    server.should_exit = True
    thread.join(timeout=15)
    sock.close()


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send, unless the server already closed the connection (its deadline passed: fine)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def read_until_closed(socks: list[socket.socket], limit_s: float) -> dict[socket.socket, bytes]:
    """What each socket received until the server closed it (or ``limit_s`` passed)."""
    received = {s: b"" for s in socks}
    selector = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ)
    open_socks = set(socks)
    deadline = time.monotonic() + limit_s
    while open_socks and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if data:
                received[sock] += data
            else:
                selector.unregister(sock)
                open_socks.discard(sock)
    selector.close()
    assert not open_socks, f"{len(open_socks)} slow connection(s) still open"
    return received


def test_slowloris_connections_are_closed_and_a_real_client_is_answered(server_port: int) -> None:
    url = f"http://127.0.0.1:{server_port}"
    socks = [socket.create_connection(("127.0.0.1", server_port)) for _ in range(CONNECTIONS)]
    try:
        for i, sock in enumerate(socks):
            send_quietly(sock, b"GET /health HTTP/1.1\r\nHo" if i % 2 else b"POST /v1/chat/compl")
        for sock in socks[:50]:  # a trickle: one more byte does not buy more time
            send_quietly(sock, b"s")
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # while the slow ones are held
        received = read_until_closed(socks, limit_s=30 * HEAD_TIMEOUT_S)
    finally:
        for sock in socks:
            sock.close()
    # each was closed with a 408 (or, when the deadline passed while this busy test was still
    # writing to it, reset before the 408 could be read)
    assert all(data.startswith(b"HTTP/1.1 408") or not data for data in received.values())
    assert sum(1 for data in received.values() if data) >= CONNECTIONS // 2
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def _whole_response(sock: socket.socket) -> bytes:
    """One response, head and body (by its content-length): a busy server may send them apart."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return data


def test_a_kept_alive_connection_gets_the_same_deadline_for_its_next_head(server_port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", server_port))
    with sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = _whole_response(sock)
        assert first.startswith(b"HTTP/1.1 200"), first
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next head, never finished
        assert read_until_closed([sock], limit_s=30 * HEAD_TIMEOUT_S)[sock].startswith(b"HTTP/1.1 408")


def test_a_head_that_arrives_in_time_is_served(server_port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", server_port))
    with sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(HEAD_TIMEOUT_S / 4)
        sock.sendall(b"Host: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
