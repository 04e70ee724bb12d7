"""Issue 23, finding 1: many resumes of one stream against a real uvicorn.
One key starts an echo stream (a token every 50 ms) and opens N resumes of it
with Last-Event-ID, one after another, each kept open; then /healthz and
another key's first byte are timed while they are attached; then all close
and the server's RSS is read again.

    cd bench && python resume_readers.py [--root DIR] [--readers 3000]

Measured (issue 23, 3,000 resumes, ulimit -n 20000; figures of one run):
before (87329cd): all 200, 67.8 s to attach (the last 500: 17.4 s),
RSS 45 -> 98 MB, still 98 MB after they closed. After (MAX_READERS_PER_STREAM
100): 99 resumes 200 and 2,901 429 in 1.0 s, RSS 45 -> 49 -> 49 MB, /healthz
0.2-0.4 ms and another key's first byte 0.6-0.7 ms while attached (idle: 0.3-0.8
and 0.6-0.8). With the bound lifted (MAX_READERS_PER_STREAM=10000): 14.0 s for
3,000, what remains being each token's fan-out to every reader, not attaching.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from run import free_port, wait_for_port

KEYS = "a:key-a,b:key-b"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def head(port: int, path: str, key: str, extra: str = "") -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n{extra}\r\n".encode())
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    return reader, writer, status


async def first_byte(port: int, path: str, key: str) -> float:
    started = time.perf_counter()
    reader, writer, _ = await head(port, path, key)
    await reader.readuntil(b"\r\n\r\n")
    await reader.read(1)
    took = time.perf_counter() - started
    writer.close()
    return took * 1000


async def main(root: Path, n: int) -> None:
    port = free_port()
    env = {**os.environ, "API_KEYS": KEYS, "MAX_STREAMS_PER_KEY": "5", "ECHO_DELAY_SECONDS": "0.05", "USAGE_DB": "",
           "RESUME_GRACE_SECONDS": "5", "PYTHONPATH": str(root)}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "asgi_stream:app", "--port", str(port), "--log-level", "warning"],
                              cwd=root, env=env)  # fmt: skip
    try:
        wait_for_port(port)
        await asyncio.sleep(0.5)
        start_rss = rss_mb(server.pid)
        prompt = "+".join(f"w{i}" for i in range(4000))
        stream_reader, stream_writer, _ = await head(port, f"/chat/stream?prompt={prompt}", "key-a")
        headers = (await stream_reader.readuntil(b"\r\n\r\n")).decode()
        stream_id = next(line.split(":")[1].strip() for line in headers.splitlines() if line.lower().startswith("x-stream-id"))
        idle_health = [await first_byte(port, "/healthz", "key-b") for _ in range(5)]
        idle_other = [await first_byte(port, "/chat/stream?prompt=hi", "key-b") for _ in range(3)]
        opened, statuses, marks = [], {}, []
        started = time.perf_counter()
        for i in range(n):
            reader, writer, status = await head(port, "/chat/stream", "key-a", f"last-event-id: {stream_id}.0\r\n")
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                opened.append((reader, writer))
            else:
                writer.close()
            if (i + 1) % 500 == 0:
                marks.append(round(time.perf_counter() - started, 2))
        attach = time.perf_counter() - started
        attached_rss = rss_mb(server.pid)
        busy_health = [await first_byte(port, "/healthz", "key-b") for _ in range(5)]
        busy_other = [await first_byte(port, "/chat/stream?prompt=hi", "key-b") for _ in range(3)]
        for _, writer in opened:
            writer.close()
        stream_writer.close()
        await asyncio.sleep(8)  # the resume grace, then the stream ends
        end_rss = rss_mb(server.pid)
        print(f"root={root} readers asked={n} statuses={statuses} attach all: {attach:.2f} s (cumulative per 500: {marks})")
        print(f"RSS MB: start {start_rss:.0f}, attached {attached_rss:.0f}, 8 s after all closed {end_rss:.0f}")
        print(f"/healthz ms idle {min(idle_health):.1f}-{max(idle_health):.1f}, attached {min(busy_health):.1f}-{max(busy_health):.1f}")
        print(f"other key first byte ms idle {min(idle_other):.1f}-{max(idle_other):.1f}, "
              f"attached {min(busy_other):.1f}-{max(busy_other):.1f}")  # fmt: skip
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--readers", type=int, default=3000)
    args = parser.parse_args()
    asyncio.run(main(args.root.resolve(), args.readers))
