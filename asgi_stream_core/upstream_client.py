"""The one shared upstream client: httpx over several connection pools."""

from __future__ import annotations

from typing import Any

import httpx

from asgi_stream_core.config import Config

UPSTREAM_POOLS = 32
POOL_SHARE = 32  # open upstream requests a pool takes before the next pool is used


class PoolShards(httpx.AsyncBaseTransport):
    """Several connection pools, each filled to POOL_SHARE open requests before
    the next is used. httpcore's pool scans all of its connections at every
    request start and end: with 1,000 streams open on one pool, that scan took
    40% of the gateway's CPU. Filling rather than round robin keeps requests
    one after another on one warm keep-alive connection: round robin opened a
    new connection in each of the pools first, a TCP connect before the first
    token of one request in six of the first two hundred."""

    def __init__(self, count: int, limits: httpx.Limits):
        tls = httpx.create_ssl_context()  # one for all: building one costs ~20 ms
        self._pools = [httpx.AsyncHTTPTransport(verify=tls, limits=limits) for _ in range(count)]
        self._open = [0] * count  # requests whose response is not closed yet, per pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shard = next((i for i, n in enumerate(self._open) if n < POOL_SHARE), None)
        if shard is None:  # all full: the least loaded
            shard = min(range(len(self._open)), key=self._open.__getitem__)
        self._open[shard] += 1
        try:
            response = await self._pools[shard].handle_async_request(request)
        except BaseException:
            self._open[shard] -= 1
            raise
        response.stream = CountedStream(response.stream, self._open, shard)
        return response

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class CountedStream(httpx.AsyncByteStream):
    """A response body that counts its request out of its pool when closed.
    Iterating is the wrapped stream's own: nothing added per read."""

    def __init__(self, stream: Any, open_requests: list[int], shard: int):
        self._stream, self._open_requests, self._shard = stream, open_requests, shard

    def __aiter__(self) -> Any:
        return self._stream.__aiter__()

    async def aclose(self) -> None:
        if self._shard >= 0:
            self._open_requests[self._shard] -= 1
            self._shard = -1
        await self._stream.aclose()


def open_client(config: Config) -> httpx.AsyncClient:
    """The one upstream client of an app (its lifespan closes it)."""
    connect = config.connect_timeout
    return httpx.AsyncClient(
        # no read timeout: the first-token, then the idle deadline are cancel scopes in the generation
        timeout=httpx.Timeout(connect=connect, read=None, write=connect, pool=connect),
        transport=PoolShards(UPSTREAM_POOLS, limits=httpx.Limits(max_connections=None, max_keepalive_connections=8)),
        follow_redirects=False,
    )
