"""The connection bounds of asgi_stream_core/connections.py, with uvicorn
serving in this process (so coverage sees them; tests/test_hostile_connections.py
drives the same through the real command lines): a connection that sends no
request head, or stops half-way, is closed at the header deadline, after a
response too; a head past the byte bound is cut; past MAX_CONNECTIONS the
connection that waited longest for a head goes, and /healthz still answers."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from asgi_stream_core import connections
from tests.conftest import serve

PROTOCOLS = {"h11": connections.H11, "httptools": connections.HttpProtocol}


OPENED: list[socket.socket] = []


@pytest.fixture(params=list(PROTOCOLS))
def url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(connections, "HEADER_TIMEOUT", 1.0)
    monkeypatch.setattr(connections, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(connections, "MAX_HEAD_BYTES", 4096)
    with serve(http=PROTOCOLS[request.param]) as served:
        try:
            yield served.url
        finally:
            while OPENED:
                OPENED.pop().close()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    OPENED.append(sock)
    return sock


def response(sock: socket.socket) -> bytes:
    """One whole response from `sock`: its head, then the body its content-length announces
    (a single recv may end between the two, as it did on a CI machine)."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closed `sock` (EOF or reset) before `seconds` passed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def test_a_connection_that_sends_nothing_or_half_a_head_is_closed_at_the_deadline(url: str) -> None:
    silent, halfway = connect(url), connect(url)
    halfway.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    assert closed_within(silent, 10) and closed_within(halfway, 10)


def test_after_a_response_the_next_head_has_its_own_deadline(url: str) -> None:
    sock = connect(url)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response(sock).startswith(b"HTTP/1.1 200 OK")
    time.sleep(0.3)  # well inside one deadline: the connection stays for the next request
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response(sock).startswith(b"HTTP/1.1 200 OK")
    assert closed_within(sock, 10)  # then idle past the deadline: closed


def test_a_head_past_the_byte_bound_is_cut(url: str) -> None:
    sock = connect(url)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 8000)
    assert closed_within(sock, 10)


def test_past_the_connection_bound_the_longest_idle_goes_and_health_still_answers(url: str) -> None:
    idle = [connect(url) for _ in range(4)]
    time.sleep(0.05)
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200  # the fifth: the oldest idle made room
    assert closed_within(idle[0], 0.4)  # before any deadline: closed for the newcomer
