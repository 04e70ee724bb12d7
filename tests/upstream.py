"""A fake LLM upstream: a real HTTP/1.1 server on 127.0.0.1, in its own thread
and event loop, that answers each request with a scripted `Reply` (status,
headers, body pieces with pauses, or a fault) and records what it saw:
the request, and whether and when the gateway closed the connection.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class Reply:
    status: int = 200
    content_type: str = "text/event-stream"
    pieces: list[bytes | float] = field(default_factory=list)  # bytes to send, or seconds to pause
    headers: dict[str, str] = field(default_factory=dict)
    end: str = "finish"  # finish | hang (never end) | close (cut mid-body) | reset (RST)
    raw: bytes | None = None  # sent instead of a whole HTTP response (garbage, half headers)
    delay_headers: float = 0.0  # pause before the status line (3600: accepts, never answers)
    repeat: list[bytes | float] = field(default_factory=list)  # after `pieces`, sent again and again until the gateway hangs up


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    started: float
    closed_by_client: float | None = None  # monotonic time the gateway hung up mid-reply
    completed: bool = False
    exchange: int = 1  # the request's number on its (kept-alive) connection

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def split(body: bytes, size: int) -> list[bytes | float]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def fixture_reply(name: str, piece_size: int = 7, pause: float = 0.0) -> Reply:
    """Replay a shared fixture the way its server would send it, in small pieces."""
    expected = json.loads((FIXTURES / name).with_suffix(".expected.json").read_text())
    body = (FIXTURES / expected["fixture"]).read_bytes()
    pieces: list[bytes | float] = []
    for piece in split(body, piece_size):
        pieces.append(piece)
        if pause:
            pieces.append(pause)
    return Reply(expected["http_status"], expected["content_type"], pieces)


def sse_tokens(tokens: list[str], finish: str = "stop", usage: dict[str, int] | None = None, pause: float = 0.0) -> Reply:
    """An OpenAI-style stream of `tokens`."""
    pieces: list[bytes | float] = []

    def event(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    for token in tokens:
        pieces.append(event({"choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]}))
        if pause:
            pieces.append(pause)
    pieces.append(event({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
    if usage is not None:
        pieces.append(event({"choices": [], "usage": usage}))
    pieces.append(b"data: [DONE]\n\n")
    return Reply(pieces=pieces)


class FakeUpstream:
    def __init__(self, responder: Callable[[Seen], Reply] | None = None):
        self.responder = responder or (lambda seen: sse_tokens(["Hello", " world"]))
        self.seen: list[Seen] = []
        self.connections = 0
        self.open_connections = 0
        self.bytes_sent = 0  # body bytes written to the gateway, all replies together
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def wait_for(self, condition: Callable[[], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.005)
        return condition()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=2048))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self.open_connections += 1
        try:
            exchange = 1
            while await self._exchange(reader, writer, exchange):
                exchange += 1
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            self.open_connections -= 1
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: int) -> bool:
        """One request and its reply; False when the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        seen = Seen(method, path, headers, body, time.monotonic(), exchange=exchange)
        self.seen.append(seen)
        reply = self.responder(seen)
        if reply.raw is not None:
            writer.write(reply.raw)
            await writer.drain()
            return False
        # While replying, the gateway sends nothing: any read result is its hang-up.
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            return await self._reply(reply, seen, writer, hangup)
        finally:
            if not hangup.done():
                hangup.cancel()
                # let the read really end: a kept-alive connection's next readuntil would find it still waiting
                await asyncio.wait({hangup})

    async def _reply(self, reply: Reply, seen: Seen, writer: asyncio.StreamWriter, hangup: asyncio.Future[bytes]) -> bool:
        async def pause(seconds: float) -> bool:  # True if the gateway hung up meanwhile
            done, _ = await asyncio.wait({hangup}, timeout=seconds)
            if done:
                seen.closed_by_client = time.monotonic()
            return bool(done)

        if reply.delay_headers and await pause(reply.delay_headers):
            return False
        head = [f"HTTP/1.1 {reply.status} X", f"content-type: {reply.content_type}", "transfer-encoding: chunked"]
        head += [f"{k}: {v}" for k, v in reply.headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        for piece in _pieces(reply):
            if isinstance(piece, float | int):
                if await pause(float(piece)):
                    return False
                continue
            if hangup.done():
                seen.closed_by_client = seen.closed_by_client or time.monotonic()
                return False
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            try:
                await writer.drain()
            except ConnectionError:  # the gateway hung up while we were writing
                seen.closed_by_client = seen.closed_by_client or time.monotonic()
                raise
            self.bytes_sent += len(piece)
        if reply.end == "hang":
            await pause(3600)
            return False
        if reply.end == "close":
            return False
        if reply.end == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        seen.completed = True
        return True


def _pieces(reply: Reply) -> Iterator[bytes | float]:
    yield from reply.pieces
    while reply.repeat:
        yield from reply.repeat
