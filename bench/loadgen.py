"""The load generator: one raw asyncio connection per stream, a prebuilt
HTTP/1.1 request, and an incremental reader for the chunked SSE reply that
counts `event: token` events (gateway) or content chunks (direct upstream).
Times are time.monotonic(), taken per socket read."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field


@dataclass
class Stream:
    bench_id: str
    start: float = 0.0
    first: float | None = None  # first token
    end: float | None = None
    closed: float | None = None  # when we hung up early
    tokens: int = 0
    done: bool = False
    error: str | None = None
    gaps: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start


def request(port: int, path: str, body: dict[str, object]) -> bytes:
    payload = json.dumps(body).encode()
    return (b"POST %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (path.encode(), port, len(payload), payload))


def gateway_request(port: int, model: str, n: int, bench_id: str) -> bytes:
    content = f"[bench:{bench_id}] stream please"
    return request(port, "/chat/stream", {"messages": [{"role": "user", "content": content}],
                                          "backend": "openai", "model": model, "max_tokens": n})


def upstream_request(port: int, model: str, n: int, bench_id: str) -> bytes:
    content = f"[bench:{bench_id}] stream please"
    return request(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                  "model": model, "max_tokens": n, "stream": True})


class Dechunker:
    """HTTP/1.1 chunked transfer decoding, incremental."""

    def __init__(self) -> None:
        self.buffer = b""
        self.left = 0  # data bytes left in the current chunk
        self.skip = 0  # bytes of the CRLF after it still to skip
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        buf, out, i = self.buffer + data, [], 0
        while i < len(buf) and not self.finished:
            if self.left:
                piece = buf[i : i + self.left]
                out.append(piece)
                self.left -= len(piece)
                i += len(piece)
                self.skip = 0 if self.left else 2
            elif self.skip:
                step = min(self.skip, len(buf) - i)
                self.skip -= step
                i += step
            else:
                line_end = buf.find(b"\r\n", i)
                if line_end < 0:
                    break
                self.left = int(buf[i:line_end].split(b";")[0], 16)
                i = line_end + 2
                if not self.left:
                    self.finished = True
                    break
        self.buffer = buf[i:]
        return b"".join(out)


async def run_stream(port: int, raw_request: bytes, stream: Stream, *, direct: bool = False,
                     close_after: int | None = None, timeout: float = 60) -> Stream:
    """Send one request and read its SSE reply to the end (or hang up after
    `close_after` tokens)."""
    marker = b'"content":" w' if direct else b"event: token\n"
    end_marker = b"data: [DONE]" if direct else b"event: done\n"
    stream.start = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw_request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                stream.error = head.split(b"\r\n", 1)[0].decode()
                return stream
            chunks, text, last = Dechunker(), b"", None
            while not chunks.finished:
                data = await reader.read(65536)
                if not data:
                    break
                now = time.monotonic()
                text += chunks.feed(data)
                events, _, text = text.rpartition(b"\n\n")
                found = events.count(marker)
                if found:
                    if stream.first is None:
                        stream.first = now
                    if last is not None:
                        stream.gaps.append(now - last)
                    last = now
                    stream.tokens += found
                if end_marker in events:
                    stream.done = True
                if close_after is not None and stream.tokens >= close_after:
                    stream.closed = time.monotonic()
                    writer.transport.abort()
                    return stream
    except TimeoutError:
        stream.error = "timeout"
    except OSError as exc:
        stream.error = type(exc).__name__
    finally:
        stream.end = time.monotonic()
        if writer is not None:
            writer.close()
    return stream


async def fetch_json(port: int, method: str, path: str) -> dict[str, object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"%s %s HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n" % (method.encode(), path.encode()))
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    body = await reader.readexactly(length)
    writer.close()
    return json.loads(body)  # type: ignore[no-any-return]
