"""Slow headers are timed out (backend/web/header_timeout.py): a client that sends one header line
every few seconds no longer holds its connection for ever. Raw sockets against a live server."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from backend.web.app import create_app
from backend.web.header_timeout import HeaderTimeoutProtocol
from tests.test_browser import _free_port

TIMEOUT_S = 0.6


class QuickTimeout(HeaderTimeoutProtocol):
    timeout_s = TIMEOUT_S


@pytest.fixture
def server(migrated):
    port = _free_port()
    config = uvicorn.Config(create_app(migrated), host="127.0.0.1", port=port, log_level="warning", http=QuickTimeout)
    served = uvicorn.Server(config)
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not served.started and time.time() < deadline:
        time.sleep(0.05)
    assert served.started
    yield port
    served.should_exit = True
    thread.join(timeout=5)


def _closed_after(sock: socket.socket, drip: float, limit: float) -> tuple[float | None, bytes]:
    """Send a header line every `drip` s until the server closes; (seconds it took, what came back)."""
    start, received = time.monotonic(), b""
    sock.settimeout(drip)
    while time.monotonic() - start < limit:
        try:
            sock.sendall(b"X-Slow: 1\r\n")
            chunk = sock.recv(4096)
            if not chunk:
                return time.monotonic() - start, received
            received += chunk
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start, received
    return None, received


def test_headers_trickled_in_are_cut_off_with_a_408(server):
    socks = [socket.create_connection(("127.0.0.1", server)) for _ in range(20)]
    for sock in socks:
        sock.sendall(b"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    took, received = _closed_after(socks[0], 0.1, 10 * TIMEOUT_S)
    assert took is not None and took < 4 * TIMEOUT_S, "a slow-header connection was never closed"
    assert received.startswith(b"HTTP/1.1 408")
    for sock in socks[1:]:  # every other one too, not just the first
        sock.settimeout(4 * TIMEOUT_S)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        sock.close()


def test_a_prompt_request_is_served_and_a_slow_second_one_on_it_is_cut_off(server):
    sock = socket.create_connection(("127.0.0.1", server))
    sock.settimeout(5)
    sock.sendall(b"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first[:200]
    time.sleep(TIMEOUT_S / 3)
    sock.sendall(b"GET /api/runs HTTP/1.1\r\n")  # the keep-alive timer stops here; the header timer does not
    took, received = _closed_after(sock, 0.1, 10 * TIMEOUT_S)
    assert took is not None and received.startswith(b"HTTP/1.1 408")
