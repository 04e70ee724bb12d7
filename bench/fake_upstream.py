"""A fake OpenAI Chat Completions upstream, fast enough never to be the
bottleneck: raw asyncio Protocol (uvloop when installed), keep-alive, every
chunk encoded once per stream shape, and a log of how each stream ended.

Model `n{N}-d{MS}` streams N tokens (" w0", " w1", ...) with token k due at
start + k*MS ms (MS=0: batches as fast as the socket takes them). Every SSE
event is its own HTTP chunk, as real providers send them. A stream whose
connection is lost before its last byte counts as cancelled, at that moment
(time.monotonic(), the same clock in every process). `[bench:ID]` in the
body names the stream. GET /stats, POST /stats/reset.

Run alone: python bench/fake_upstream.py --port 8199
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from functools import cache
from typing import Any

MODEL = re.compile(rb'"model":\s*"n(\d+)-d(\d+)"')
BENCH_ID = re.compile(rb"\[bench:([\w.-]+)\]")
BATCH = 256  # tokens per write at delay 0


def http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def sse(obj: dict[str, Any]) -> bytes:
    return http_chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


@cache
def script(n: int) -> tuple[bytes, list[bytes], bytes]:
    """(head, token chunks, tail) of an n-token stream, encoded once."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": f"n{n}"}

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra})

    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            + chunk({"role": "assistant", "content": ""}, None))
    tokens = [chunk({"content": f" w{i}"}, None) for i in range(n)]
    usage = sse({**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": n + 9}})
    tail = chunk({}, "stop") + usage + http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    return head, tokens, tail


class Stats:
    def __init__(self) -> None:
        self.streams: list[dict[str, Any]] = []

    def new(self, bench_id: str, n: int) -> dict[str, Any]:
        record = {"id": bench_id, "n": n, "start": time.monotonic(), "end": None, "state": "running", "sent": 0}
        self.streams.append(record)
        return record

    def summary(self) -> dict[str, Any]:
        states = [s["state"] for s in self.streams]
        return {"started": len(states), **{k: states.count(k) for k in ("running", "completed", "cancelled")},
                "streams": self.streams}


class Upstream(asyncio.Protocol):
    def __init__(self, stats: Stats):
        self.stats = stats
        self.buffer = b""
        self.stream: dict[str, Any] | None = None  # the one in flight on this connection
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        if self.stream is not None and self.stream["state"] == "running":
            self.stream.update(state="cancelled", end=time.monotonic())
        self.stream = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            length = int(m.group(1)) if (m := re.search(rb"content-length:\s*(\d+)", head)) else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.handle(head.split(b" ", 2), body)

    def handle(self, request_line: list[bytes], body: bytes) -> None:
        method, path = request_line[0], request_line[1]
        if path.startswith(b"/stats"):
            if method == b"post":
                self.stats.streams.clear()
            payload = json.dumps(self.stats.summary()).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(payload), payload))
            return
        model = MODEL.search(body)
        n, delay = (int(model.group(1)), int(model.group(2))) if model else (16, 0)
        bench_id = m.group(1).decode() if (m := BENCH_ID.search(body)) else "-"
        self.stream = self.stats.new(bench_id, n)
        asyncio.get_running_loop().create_task(self.play(self.stream, n, delay / 1000))

    async def play(self, stream: dict[str, Any], n: int, delay: float) -> None:
        head, tokens, tail = script(n)
        write, loop = self.transport.write, asyncio.get_running_loop()
        write(head)
        start = loop.time()
        step = BATCH if delay == 0 else 1
        for i in range(0, n, step):
            if stream["state"] != "running":
                return
            if delay:
                wait = start + i * delay - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            else:
                await self.writable.wait()
            if stream["state"] != "running":
                return
            write(b"".join(tokens[i : i + step]))
            stream["sent"] = min(i + step, n)
        write(tail)
        stream.update(state="completed", end=time.monotonic())
        if self.stream is stream:
            self.stream = None


async def serve(port: int, ready: asyncio.Event | None = None) -> None:
    stats = Stats()
    server = await asyncio.get_running_loop().create_server(lambda: Upstream(stats), "127.0.0.1", port, backlog=4096)
    print(f"fake upstream on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8199)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port))
    else:
        uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
