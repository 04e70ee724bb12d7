"""Shared test machinery: the gateway served by a real uvicorn on 127.0.0.1
(in a thread, so coverage sees it), and an SSE reader built on httpx-sse, an
independent parser."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from httpx_sse import EventSource

import asgi_stream

BASE_ENV = {"USAGE_DB": "", "RESUME_GRACE_SECONDS": "0", "HEARTBEAT_SECONDS": "15", "ECHO_DELAY_SECONDS": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    gateway: asgi_stream.Gateway
    server: uvicorn.Server


@contextmanager
def serve(env: dict[str, str] | None = None, **uvicorn_options: object) -> Iterator[Served]:
    """The gateway with `env` as its whole environment, on a real socket."""
    gateway = asgi_stream.Gateway({**BASE_ENV, **(env or {})})
    port = free_port()
    config = uvicorn.Config(gateway, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=2, **uvicorn_options)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{port}", gateway, server)
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class Result:
    status: int
    headers: httpx.Headers
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (event, data, id), the opening `stream` event apart
    body: bytes = b""
    opened: tuple[str, str] | None = None  # a new stream's opening `stream` event: (data, id)

    def of(self, name: str) -> list[str]:
        return [data for event, data, _ in self.events if event == name]

    @property
    def text(self) -> str:
        return "".join(self.of("token"))

    @property
    def names(self) -> list[str]:
        return [event for event, _, _ in self.events]


def stream(method: str, url: str, timeout: float = 20, **kwargs: object) -> Result:
    """Run one request to its end and parse the event stream (if it is one)."""
    with httpx.Client(timeout=timeout) as client, client.stream(method, url, **kwargs) as response:  # type: ignore[arg-type]
        result = Result(response.status_code, response.headers)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            for sse in EventSource(response).iter_sse():
                if sse.event == "stream" and not result.events and result.opened is None:
                    result.opened = (sse.data, sse.id)
                    assert (sse.data, sse.id) == (response.headers["x-stream-id"], response.headers["x-stream-id"] + ".0")
                else:
                    result.events.append((sse.event, sse.data, sse.id))
        else:
            result.body = response.read()
    return result


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """In-process tests run on both event loops the app supports."""
    return str(request.param)
