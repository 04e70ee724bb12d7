"""What the Redis store costs in Redis: round trips and commands per token,
bytes per held stream (MEMORY USAGE), and the cross-replica cancel latency.
Starts its own redis-server and two gateways (uvicorn in threads, echo backend).

    python bench/redis_costs.py [--streams 100] [--tokens 200] [--delay 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import serve
from tests.redis_server import RedisServer


def command_calls(server: RedisServer) -> dict[str, int]:
    stats = server.command("INFO", "commandstats").decode()
    calls = {}
    for line in stats.splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line.partition(":")
            calls[name.removeprefix("cmdstat_")] = int(fields.split("calls=")[1].split(",")[0])
    return calls


async def run_streams(url: str, streams: int, tokens: int) -> list[str]:
    prompt = " ".join(f"w{i}" for i in range(tokens))
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None)) as client:
        async def one() -> str:
            async with client.stream("GET", url + "/chat/stream", params={"prompt": prompt}) as response:
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
                assert response.status_code == 200, (response.status_code, body)
                return response.headers["x-stream-id"]
        return list(await asyncio.gather(*(one() for _ in range(streams))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.01, help="echo backend: seconds between tokens")
    args = parser.parse_args()
    redis = RedisServer(Path(tempfile.mkdtemp()))
    redis.start()
    env = {"REDIS_URL": redis.url, "ECHO_DELAY_SECONDS": str(args.delay), "RESUME_GRACE_SECONDS": "30",
           "MAX_STREAMS": "100000", "MAX_STREAMS_PER_KEY": "100000"}
    try:
        with serve(env) as one, serve({**env, "ECHO_DELAY_SECONDS": "0.05"}) as two:
            before = command_calls(redis)
            ids = asyncio.run(run_streams(one.url, args.streams, args.tokens))
            time.sleep(0.5)
            after = command_calls(redis)
            calls = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
            calls.pop("info", None)
            total_tokens = args.streams * args.tokens
            flushes = one.gateway.start().store.flushes
            print(f"{args.streams} streams x {args.tokens} tokens, a token every {args.delay * 1000:g} ms per stream")
            print(f"  write-behind round trips (pipelines): {flushes}, {flushes / total_tokens:.4f} per token")
            print(f"  Redis commands: {sum(calls.values())}, {sum(calls.values()) / total_tokens:.3f} per token: {calls}")
            usage = [int(redis.command("MEMORY", "USAGE", f"asgi-stream:{i}:{part}")[1:].split(b"\r\n")[0])
                     for i in ids for part in ("events", "meta")]
            print(f"  Redis bytes per held finished stream (events + meta, MEMORY USAGE): {sum(usage) / len(ids):.0f}"
                  f" ({sum(usage) / len(ids) / (args.tokens + 2):.1f} per event)")
            latencies = []
            with httpx.Client(timeout=30) as client:
                for _ in range(10):
                    with client.stream("GET", two.url + "/chat/stream", params={"prompt": "x " * 400}) as response:
                        sid = response.headers["x-stream-id"]
                        lines = response.iter_lines()
                        next(lines)
                        asked = time.perf_counter()
                        assert client.delete(f"{one.url}/chat/stream/{sid}").status_code == 204
                        assert "data: cancelled" in list(lines)
                        latencies.append((time.perf_counter() - asked) * 1000)
            print(f"  cross-replica cancel (DELETE on another replica -> the owner's reader sees done), ms:"
                  f" median {statistics.median(latencies):.1f}, max {max(latencies):.1f}")
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
