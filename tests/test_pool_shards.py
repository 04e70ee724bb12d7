"""The upstream pools: requests one after another reuse one keep-alive
connection, and open requests fill a pool to POOL_SHARE before the next one
takes any; a closed response counts itself out. A real server on 127.0.0.1."""

from __future__ import annotations

from contextlib import AsyncExitStack

import httpx
import pytest

from asgi_stream_core.upstream_client import POOL_SHARE, PoolShards
from tests.faultkit import internal
from tests.upstream import FakeUpstream, Reply, sse_tokens

pytestmark = pytest.mark.anyio


def connections(transport: PoolShards) -> list[int]:
    return [len(internal(internal(shard, "_pool", "httpx"), "connections", "httpcore")) for shard in transport._pools]


async def test_requests_one_after_another_share_one_connection() -> None:
    transport = PoolShards(4, httpx.Limits(max_keepalive_connections=8))
    with FakeUpstream(lambda seen: sse_tokens(["a", "b"])) as upstream:
        async with httpx.AsyncClient(transport=transport) as http:
            for _ in range(6):
                async with http.stream("POST", upstream.url + "/v1/chat/completions", content=b"{}") as response:
                    assert b"[DONE]" in await response.aread()
            assert connections(transport) == [1, 0, 0, 0]  # round robin had opened one in each pool
            assert transport._open == [0, 0, 0, 0]


async def test_open_requests_fill_one_pool_before_the_next() -> None:
    transport = PoolShards(3, httpx.Limits(max_keepalive_connections=8))
    with FakeUpstream(lambda seen: Reply(pieces=[b"data: {}\n\n"], end="hang")) as upstream:
        async with httpx.AsyncClient(transport=transport) as http, AsyncExitStack() as open_responses:
            for _ in range(POOL_SHARE + 3):
                await open_responses.enter_async_context(http.stream("POST", upstream.url + "/v1/chat/completions", content=b"{}"))
            assert transport._open == [POOL_SHARE, 3, 0]
            await open_responses.aclose()
            assert transport._open == [0, 0, 0]
