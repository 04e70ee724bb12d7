"""How long the app itself takes from a client's leaving to closing the
upstream connection, without a server or the harness's sockets in the way:
each stream is driven in-process against bench/fake_upstream.py, its client
leaves (receive() returns http.disconnect) once it has had five body
messages, and the time runs from that moment until httpcore starts closing
the upstream connection. With `--wave 20` twenty clients leave at the same
moment, as in the shared harness's disconnect scenario: then the work each
stream does in the loop turns before its close delays the closes of the
others.

    python bench/cancel_latency.py [--streams 200] [--wave 20]
    python bench/cancel_latency.py --relay /work/shared/bench/apps/relay_app.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import anyio
import httpcore._backends.anyio as httpcore_anyio
from stream_memory import fake_upstream, load_app, run_stream, start_lifespan

MODEL = "n2000-d10"  # a token every 10 ms: the read pending when the client leaves, as in the harness


async def measure(app: Any, body: bytes, count: int, size: int) -> list[float]:
    closes: list[float] = []
    original_aclose = httpcore_anyio.AnyIOStream.aclose

    async def noted_aclose(self: Any) -> None:
        closes.append(time.perf_counter())
        await original_aclose(self)

    httpcore_anyio.AnyIOStream.aclose = noted_aclose  # type: ignore[method-assign]
    latencies = []

    async def wave() -> None:
        """`size` streams at once; all clients leave together once each has had five body messages."""
        leave, left, ready = anyio.Event(), [0.0], [0]

        async def one() -> None:
            bodies = 0

            async def send(message: dict[str, Any]) -> None:
                nonlocal bodies
                bodies += message["type"] == "http.response.body"
                if bodies == 5:
                    ready[0] += 1
                    if ready[0] == size:
                        left[0] = time.perf_counter()
                        leave.set()

            await asyncio.create_task(run_stream(app, body, leave, send))  # its own task, as under uvicorn: the relay cancels it

        seen = len(closes)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as streams:
                for _ in range(size):
                    streams.start_soon(one)
            while len(closes) < seen + size:  # the relay's close may follow its return by a turn
                await anyio.sleep(0)
        latencies.extend((close - left[0]) * 1000 for close in closes[seen:])

    async with anyio.create_task_group() as server:
        start_lifespan(app, server)
        await anyio.sleep(0.1)
        for _ in range(2):  # warm-up
            await wave()
        latencies.clear()
        for _ in range(count // size):
            await wave()
        server.cancel_scope.cancel()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--wave", type=int, default=1, help="streams whose clients leave at the same moment (the harness: 20)")
    parser.add_argument("--relay", help="measure this relay app file (the shared harness's) instead of the gateway")
    args = parser.parse_args()
    with fake_upstream():
        app, body = load_app(args.relay, MODEL)
        latencies = anyio.run(measure, app, body, args.streams, args.wave, backend_options={"use_uvloop": True})
    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"disconnect -> upstream close, {len(latencies)} streams in waves of {args.wave}: p50 {cuts[49] * 1000:.0f} us, "
        f"p90 {cuts[89] * 1000:.0f} us, p99 {cuts[98] * 1000:.0f} us"
    )


if __name__ == "__main__":
    main()
