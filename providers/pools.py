"""Key pools: several keys for one upstream (CONFIG_FILE's `keys`), spread
across requests in turn. A key that gets 429 rests for its Retry-After (or
REST_WITHOUT_RETRY_AFTER) while the others serve; a key that gets 401 or 403
is taken out of the pool for the life of the process and logged by its
variable's name, never its value. State per process."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import replace

import httpx
import orjson

from providers import NO_KEY, ChatRequest, Chunk, Provider, Upstream, UpstreamError

log = logging.getLogger("asgi_stream")

REST_WITHOUT_RETRY_AFTER = 30.0  # seconds a key rests after a 429 that said for how long
REFUSED_KEY_STATUSES = frozenset({401, 403})


class KeyPool:
    """One upstream's keys, (variable, value) each, handed out in turn."""

    def __init__(self, upstream: str, keys: Sequence[tuple[str, str]]):
        self.upstream = upstream
        self.keys = list(keys)
        self.turn = 0  # the index the next request starts looking from
        self.resting: dict[str, float] = {}  # variable -> monotonic time it serves again
        self.refused: set[str] = set()  # variables taken out (401, 403)

    def serves(self, variable: str, now: float) -> bool:
        return variable not in self.refused and self.resting.get(variable, 0.0) <= now

    def in_service(self) -> int:
        now = time.monotonic()
        return sum(self.serves(variable, now) for variable, _ in self.keys)

    def take(self, skip: set[str]) -> tuple[str, str] | None:
        """The next key in service that this request has not tried (`skip`), in turn."""
        now = time.monotonic()
        for step in range(len(self.keys)):
            variable, value = self.keys[(self.turn + step) % len(self.keys)]
            if variable not in skip and self.serves(variable, now):
                self.turn = (self.turn + step + 1) % len(self.keys)
                return variable, value
        return None

    def rest(self, variable: str, seconds: float | None) -> None:
        self.resting[variable] = time.monotonic() + (REST_WITHOUT_RETRY_AFTER if seconds is None else seconds)

    def refuse(self, variable: str, status: int) -> None:
        self.refused.add(variable)
        log.warning(orjson.dumps({"event": "key_refused", "upstream": self.upstream, "variable": variable, "status": status,
                                  "keys_in_service": self.in_service()}).decode())  # fmt: skip

    def retry_after(self) -> float | None:
        """When the first resting key serves again (None if none rests)."""
        now = time.monotonic()
        waits = [until - now for variable, until in self.resting.items() if variable not in self.refused and until > now]
        return min(waits) if waits else None


def pooled(provider: Provider, pool: KeyPool) -> Provider:
    """`provider` with a key from `pool` for each request: before the first chunk a
    429 rests the key and a 401 or 403 takes it out, and the request moves on to
    the pool's next key; when none is left the last failure (or, with none tried,
    a retryable `no_key_in_service`) is the request's."""

    async def stream(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
        tried: set[str] = set()
        failure: UpstreamError | None = None
        while (key := pool.take(tried)) is not None:
            variable, value = key
            tried.add(variable)
            sent = False
            try:
                async with aclosing(provider(http, replace(upstream, api_key=value), request)) as chunks:
                    async for chunk in chunks:
                        sent = True
                        yield chunk
                return
            except UpstreamError as exc:
                if sent or (exc.status != 429 and exc.status not in REFUSED_KEY_STATUSES):
                    raise
                if exc.status == 429:
                    pool.rest(variable, exc.retry_after)
                else:
                    pool.refuse(variable, exc.status)
                failure = exc
        if failure is not None:
            raise failure
        message = f"no key of {pool.upstream} is in service: each rests after a 429 or was refused"
        raise UpstreamError("upstream_unavailable", message, retry_after=pool.retry_after(), code=NO_KEY, retryable=True)

    return stream
