"""A 5-token stream's first token, in process, on /chat/stream and on
/v1/chat/completions, which holds its status until the first output.
bench/fake_upstream.py serves the whole answer in one read, as a probe in the
shared harness gets it: the generation yields once after its first token,
then parses the rest of the read, so a door that needs more than that one
loop turn to send the token sends it after the whole answer (ninth session:
/v1's `until` did; docs/benchmarks.md).

    python bench/door_first_token.py [--streams 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_memory import chat_scope, fake_upstream, load_app, start_lifespan


async def first_token(app: Any, path: str, body: bytes) -> dict[str, float]:
    """ms after the app was called until the first token was sent."""
    scope = {**chat_scope(body), "path": path, "raw_path": path.encode()}
    request, gone, sent = [{"type": "http.request", "body": body, "more_body": False}], anyio.Event(), {}

    async def receive() -> dict[str, Any]:
        if request:
            return request.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and b"w0" in message.get("body", b"") and not sent:
            sent["first token sent"] = time.perf_counter()

    called = time.perf_counter()
    await app(scope, receive, send)
    return {name: (at - called) * 1000 for name, at in sent.items()}


async def measure(streams: int) -> None:
    app, body = load_app(None, model="n5-d0")
    v1 = orjson.dumps({"model": "openai/n5-d0", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    async with anyio.create_task_group() as server:
        start_lifespan(app, server)
        await anyio.sleep(0.5)
        for path, door_body in (("/chat/stream", body), ("/v1/chat/completions", v1)) * 2:
            runs = [await first_token(app, path, door_body) for _ in range(streams)][streams // 4 :]  # the first quarter warms up
            medians = {name: statistics.median(run[name] for run in runs) for name in sorted({n for run in runs for n in run})}
            print(f"{path:22}", "  ".join(f"{name} {value:.2f} ms" for name, value in medians.items()))
        server.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200, help="streams per door and round (two rounds)")
    args = parser.parse_args()
    with fake_upstream():
        anyio.run(measure, args.streams)


if __name__ == "__main__":
    main()
