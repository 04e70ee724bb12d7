"""uvicorn's HTTP protocol with two bounds uvicorn lacks (issue 23, finding
2). uvicorn times out neither a connection that never sends a request nor
one that dribbles its head, and `--limit-concurrency` answers 503 only once
a request head is complete, counting idle connections too: a few hundred
silent connections used every file the process may open, and `/healthz`
went unanswered. Served with

    uvicorn asgi_stream:app --http asgi_stream_core.connections:HttpProtocol

(as `python -m asgi_stream` and the image's CMD do), each connection:

- gets HEADER_TIMEOUT_SECONDS (default 10) to send a whole request head, from
  when it opens or its last response ended; it is closed after that, or when
  its unfinished head passes MAX_HEAD_BYTES;
- counts against MAX_CONNECTIONS for the process (default: half the open-file
  limit less 64 for the upstream connections, the ledger and the rest, at
  most 10,000). A connection past the bound closes the connection that has
  waited longest for a request head; if every connection has a request under
  way, the newcomer is closed at once.

The settings are read from the environment when uvicorn imports this module,
before it serves; HttpProtocol is uvicorn's httptools protocol where
httptools is installed (`uvicorn[standard]`), else its h11 protocol, as
uvicorn's own `auto` picks."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from asgi_stream_core.config import number

RESERVED_FILES = 64  # the listening socket, the loop, the ledger, logs, stores: files that are no client connection
MAX_HEAD_BYTES = 1 << 20  # far above the app's own 431 at 64 KB, so that refusal still answers

try:
    import resource
except ImportError:  # pragma: no cover - Windows: no open-file limit to read
    OPEN_FILES = -1
else:
    OPEN_FILES = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # RLIM_INFINITY: -1
FROM_FILES = max(16, (OPEN_FILES - RESERVED_FILES) // 2) if OPEN_FILES > 0 else 10_000
HEADER_TIMEOUT = number(os.environ, "HEADER_TIMEOUT_SECONDS", 10.0, 0.1)
MAX_CONNECTIONS = min(int(number(os.environ, "MAX_CONNECTIONS", 10_000, 1)), FROM_FILES)

_waiting: dict[Any, None] = {}  # connections waiting for a request head, longest first (one process: one file limit)
_counted: set[Any] = set()  # connections that count against MAX_CONNECTIONS: open, and not closed by us


class _Bounded(asyncio.Protocol):
    """The bounds, over uvicorn's protocol (the next class in the MRO)."""

    _deadline: asyncio.TimerHandle | None = None
    _head_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        _counted.add(self)
        if len(_counted) > MAX_CONNECTIONS:
            oldest = next(iter(_waiting), self)  # self waits in none yet: no idle one, the newcomer goes
            oldest.close_connection()
        if self in _counted:
            self.wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_waiting()
        _counted.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self in _waiting:
            self._head_bytes += len(data)
            if self.request_under_way():
                self.stop_waiting()
            elif self._head_bytes > MAX_HEAD_BYTES:
                self.close_connection()

    def on_response_complete(self) -> None:
        us: Any = super()
        us.on_response_complete()
        view: Any = self
        if self in _counted and not view.transport.is_closing() and not self.request_under_way():
            self.wait_for_head()  # keep-alive: the next request head has its own deadline

    def request_under_way(self) -> bool:
        cycle = getattr(self, "cycle", None)
        return cycle is not None and not cycle.response_complete

    def wait_for_head(self) -> None:
        self.stop_waiting()
        view: Any = self
        self._head_bytes, _waiting[self] = 0, None
        self._deadline = view.loop.call_later(HEADER_TIMEOUT, self.close_connection)

    def stop_waiting(self) -> None:
        _waiting.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def close_connection(self) -> None:
        """Close without an answer: no request is under way (or none can be served)."""
        self.stop_waiting()
        _counted.discard(self)
        view: Any = self
        if not view.transport.is_closing():
            view.transport.close()


class H11(_Bounded, H11Protocol):
    """uvicorn's h11 protocol, bounded."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - without httptools, as the image installs uvicorn
    HttpProtocol: type[asyncio.Protocol] = H11
else:

    class HttpTools(_Bounded, HttpToolsProtocol):
        """uvicorn's httptools protocol, bounded."""

    HttpProtocol = HttpTools
