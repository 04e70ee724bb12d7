"""What an open stream costs in memory, and where: N streams held open at once
in-process (no ASGI server, so only the app's own share), against
bench/fake_upstream.py, measured mid-stream with tracemalloc.

    python bench/stream_memory.py [--streams 500] [--by filename|lineno|traceback|caller]
    python bench/stream_memory.py --relay /work/shared/bench/apps/relay_app.py

`--by caller` charges each block to the app's own line that led to it (a
task group, a spawn, the upstream request), which `lineno` (the allocating
line, mostly anyio's or httpx's) does not tell. The figure has two modes
about 2 KiB apart, as a table every stream shares (asyncio's set of async
generators, anyio's task states) is resized during the measured round or not.

The shared harness's fanout `KiB/stream` is RSS under overload (backlog and
the server's connection included); this is the structure of one stream
without backlog, which is what a change to tasks, scopes or buffers moves.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import subprocess
import sys
import tracemalloc
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
from anyio.abc import TaskGroup

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from run import free_port, wait_for_port  # noqa: E402

MODEL = "n400-d50"  # 400 tokens 50 ms apart: every stream is still open when measured


@contextmanager
def fake_upstream() -> Iterator[None]:
    """bench/fake_upstream.py on a free port, and the settings that point the gateway at it
    with its limits lifted, no ledger, no resume grace (as the shared harness runs it)."""
    port = free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(port)], stdout=subprocess.DEVNULL)
    os.environ.update(
        {
            "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
            "OPENAI_API_KEY": "bench",
            "USAGE_DB": "",
            "LOG_LEVEL": "warning",
            "MAX_STREAMS": "100000",
            "MAX_STREAMS_PER_KEY": "100000",
            "MAX_TOKENS_LIMIT": "1000000",
            "RESUME_GRACE_SECONDS": "0",
        }
    )
    try:
        wait_for_port(port)
        yield
    finally:
        upstream.terminate()
        upstream.wait(30)


def load_app(relay: str | None, model: str = MODEL, prompt_bytes: int = 2) -> tuple[Any, bytes]:
    """The app and the request body it takes: the gateway's, or a relay's (raw OpenAI),
    its one message `prompt_bytes` long."""
    messages = [{"role": "user", "content": "hi".ljust(prompt_bytes, ".")}]
    if relay:
        spec = importlib.util.spec_from_file_location("relay_app", relay)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.app, orjson.dumps({"messages": messages, "model": model, "stream": True})
    from asgi_stream import Gateway

    body = {"messages": messages, "backend": "openai", "model": model, "max_tokens": 4000}
    return Gateway(os.environ), orjson.dumps(body)


def chat_scope(body: bytes) -> dict[str, Any]:
    """The scope of a `POST /chat/stream` carrying `body`, as a server passes it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/chat/stream",
        "raw_path": b"/chat/stream",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }


def start_lifespan(app: Any, server: TaskGroup) -> None:
    """Run the app's lifespan in `server` up to its startup; cancelling `server` ends it."""
    startup = [{"type": "lifespan.startup"}]

    async def receive() -> dict[str, Any]:
        if startup:
            return startup.pop()
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        pass

    server.start_soon(app, {"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)


async def ignore(message: dict[str, Any]) -> None:
    pass


async def run_stream(app: Any, body: bytes, gone: anyio.Event, send: Callable[[dict[str, Any]], Awaitable[None]] = ignore) -> None:
    """One `POST /chat/stream` of `body` whose client leaves when `gone` is set."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    await app(chat_scope(body), receive, send)


async def measure(app: Any, body: bytes, count: int, group_by: str, top: int) -> None:
    async with anyio.create_task_group() as server:
        start_lifespan(app, server)
        for n, snapshot in ((50, False), (count, True)):  # the first round warms pools and caches up
            gone = anyio.Event()
            gc.collect()
            before = tracemalloc.take_snapshot() if snapshot else None
            start = tracemalloc.get_traced_memory()[0]
            async with anyio.create_task_group() as streams:
                for _ in range(n):
                    streams.start_soon(run_stream, app, body, gone)
                await anyio.sleep(4)  # every stream has its upstream open and some tokens held
                gc.collect()
                grown = (tracemalloc.get_traced_memory()[0] - start) / n
                after = tracemalloc.take_snapshot() if snapshot else None
                gone.set()
        server.cancel_scope.cancel()
    print(f"{count} open streams: {grown / 1024:.1f} KiB per stream (tracemalloc, in-process)")
    assert before is not None and after is not None
    if group_by == "caller":
        return print_by_caller(after.compare_to(before, "traceback"), count, top)
    for stat in after.compare_to(before, group_by)[:top]:
        print(f"  {stat.size_diff / count:8.0f} B  {stat.count_diff / count:5.1f} blocks")
        where = stat.traceback[0]
        frames = {"traceback": stat.traceback.format(), "lineno": [f"{where.filename}:{where.lineno}"]}.get(group_by, [where.filename])
        for frame in frames[-12:]:
            if not frame.lstrip().startswith("File"):
                print("      " + frame.strip().replace(str(ROOT) + "/", ""))


def app_frame(frame: tracemalloc.Frame) -> bool:
    """A frame of the app's own code: the gateway's packages, or a relay's file."""
    path = frame.filename
    return any(f"/{room}/" in path for room in ("asgi_stream_core", "providers")) or path.endswith(("/asgi_stream.py", "_app.py"))


def print_by_caller(stats: list[tracemalloc.StatisticDiff], count: int, top: int) -> None:
    """Each allocation counted at the app's innermost line on its stack (what the app did
    that made it: a task group, a spawn, an upstream request), with the library lines that
    allocated the most under it. Small dicts, lists and tuples come from free lists without
    a new trace, so a line may be charged with a block another line later took over."""
    sizes: Counter[str] = Counter()
    blocks: Counter[str] = Counter()
    under: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for stat in stats:
        frames = list(stat.traceback)  # oldest first
        ours = next((f for f in reversed(frames) if app_frame(f)), None)
        line = f"{ours.filename}:{ours.lineno}".replace(str(ROOT) + "/", "") if ours else "(no app frame: the bench, the loop, sockets)"
        sizes[line] += stat.size_diff
        blocks[line] += stat.count_diff
        under[line][f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"] += stat.size_diff
    for line, size in sizes.most_common(top):
        print(f"  {size / count:8.0f} B  {blocks[line] / count:5.1f} blocks  {line}")
        print("      " + ", ".join(f"{allocator} {size / count:.0f}" for allocator, size in under[line].most_common(4) if size > 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--by", choices=("filename", "lineno", "traceback", "caller"), default="filename",
                        help="caller: by the app's innermost line on the allocation's stack")
    parser.add_argument("--relay", help="measure this relay app file (the shared harness's) instead of the gateway")
    parser.add_argument("--prompt-bytes", type=int, default=2, help="the length of the one message (2: \"hi\")")
    args = parser.parse_args()
    with fake_upstream():
        app, body = load_app(args.relay, prompt_bytes=args.prompt_bytes)
        tracemalloc.start({"traceback": 12, "caller": 60}.get(args.by, 1))
        anyio.run(measure, app, body, args.streams, args.by, args.top, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
