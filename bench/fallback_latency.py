"""What a fallback adds before the first token: the time from a request's start
to its first `token` event, through an alias whose first target answers 503 at
once (then a good one), against the good upstream named directly. The app
runs in-process on asyncio; both upstreams are tests/upstream.py's
FakeUpstream on real sockets (127.0.0.1), so the figure holds one extra
upstream request and answer, and the gateway's own work for an attempt.

    python bench/fallback_latency.py [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asgi_stream import Gateway  # noqa: E402
from tests.upstream import FakeUpstream, Reply, sse_tokens  # noqa: E402

ROUTING = """
[upstreams.down]
format = "openai"
base_url = "{down}/v1"
default_model = "m"
keys = ["BENCH_KEY"]

[upstreams.up]
format = "openai"
base_url = "{up}/v1"
default_model = "m"
keys = ["BENCH_KEY"]

[aliases]
fallback = ["down/m", "up/m"]
"""


async def first_token_seconds(app: Gateway, fields: dict[str, Any]) -> float:
    """One /chat/stream request, until its first token event; then the client leaves."""
    body = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], **fields})
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/chat/stream", "raw_path": b"/chat/stream", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}  # fmt: skip
    left, sent_body = asyncio.Event(), [False]
    first: list[float] = []

    async def receive() -> dict[str, Any]:
        if not sent_body[0]:
            sent_body[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if not first and b"event: token" in message.get("body", b""):
            first.append(time.perf_counter())
            left.set()

    started = time.perf_counter()
    await app(scope, receive, send)
    return first[0] - started


async def main(requests: int) -> None:
    with FakeUpstream(lambda seen: Reply(503, "application/json", [b'{"error": {"message": "busy"}}'])) as down, \
            FakeUpstream(lambda seen: sse_tokens(["Hello", " world"])) as up, tempfile.TemporaryDirectory() as tmp:  # fmt: skip
        path = Path(tmp) / "routing.toml"
        path.write_text(ROUTING.format(down=down.url, up=up.url))
        app = Gateway({"CONFIG_FILE": str(path), "BENCH_KEY": "k", "USAGE_DB": "", "RESUME_GRACE_SECONDS": "0"})
        app.start()
        for _ in range(20):  # warm the connection pools and the code paths
            await first_token_seconds(app, {"backend": "up"})
            await first_token_seconds(app, {"model": "fallback"})
        direct, through = [], []
        for _ in range(requests):  # interleaved, so that drift affects both alike
            direct.append(await first_token_seconds(app, {"backend": "up"}))
            through.append(await first_token_seconds(app, {"model": "fallback"}))
        await app.aclose()
    assert app.metrics.attempts[("down", "503")] == requests + 20 and app.metrics.attempts[("up", "served")] == requests + 20

    def ms(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100)[q - 1] * 1000

    print(f"{requests} requests each, time to the first token (ms):")
    for name, values in (("direct to the good upstream", direct), ("alias: 503 at once, then it", through)):
        print(f"  {name:30} median {statistics.median(values) * 1000:6.2f}   p90 {ms(values, 90):6.2f}   p99 {ms(values, 99):6.2f}")
    print(f"  fallback adds (median)        {(statistics.median(through) - statistics.median(direct)) * 1000:6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    logging.getLogger("asgi_stream").setLevel(logging.WARNING)  # the per-stream log lines
    asyncio.run(main(parser.parse_args().requests))
