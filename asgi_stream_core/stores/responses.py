"""Responses state: the input and output items of each stored response of
`/v1/responses`, kept for RESPONSES_TTL_SECONDS so that a later request can
continue from it (`previous_response_id`) or point at its items
(`item_reference`), and bound to the API key that made it: another key's
response is as unknown as one that never was. In this process's memory, or
with REDIS_URL in Redis (a key per response, expiring with it), so any
replica resolves a reference another one made."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from asgi_stream_core.config import Config
from asgi_stream_core.stores import Store
from asgi_stream_core.types import Refusal, store_unavailable

if TYPE_CHECKING:
    from asgi_stream_core.stores.redis import RedisStore

log = logging.getLogger("asgi_stream")

Items = list[dict[str, Any]]
MEMORY_BYTES = 64 * 1024 * 1024  # one process holds at most this much (JSON); the oldest responses go first
REDIS_PREFIX = "asgi-stream:response:"


class ResponseItems(Protocol):
    async def keep(self, response_id: str, key_name: str | None, input_items: Items, output_items: Items) -> None: ...
    async def find(self, response_id: str, key_name: str | None) -> tuple[Items, Items] | None: ...  # (input, output)


def stored(key_name: str | None, input_items: Items, output_items: Items) -> bytes:
    return orjson.dumps({"key": key_name, "input": input_items, "output": output_items})


def of_key(value: bytes, key_name: str | None) -> tuple[Items, Items] | None:
    kept = orjson.loads(value)
    return (kept["input"], kept["output"]) if kept["key"] == key_name else None


class MemoryResponseItems:
    """This process's stored responses, each until its expiry, oldest evicted
    first beyond MEMORY_BYTES. Held as JSON: nothing a client later changes in
    what it was given changes what is kept."""

    def __init__(self, ttl: float, max_bytes: int = MEMORY_BYTES):
        self.ttl, self.max_bytes = ttl, max_bytes
        self.held: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # response id -> (expiry, JSON), oldest first
        self.bytes = 0

    async def keep(self, response_id: str, key_name: str | None, input_items: Items, output_items: Items) -> None:
        if self.ttl <= 0:
            return
        value = stored(key_name, input_items, output_items)
        if len(value) > self.max_bytes:
            return
        self.held[response_id] = (time.monotonic() + self.ttl, value)
        self.bytes += len(value)
        while self.bytes > self.max_bytes or self.expired_first():
            self.bytes -= len(self.held.popitem(last=False)[1][1])

    def expired_first(self) -> bool:
        """Whether the oldest response has expired (all share one TTL: expiry follows age)."""
        return bool(self.held) and next(iter(self.held.values()))[0] <= time.monotonic()

    async def find(self, response_id: str, key_name: str | None) -> tuple[Items, Items] | None:
        held = self.held.get(response_id)
        if held is None or held[0] <= time.monotonic():
            return None
        return of_key(held[1], key_name)


class RedisResponseItems:
    """Stored responses in Redis: a key per response, expiring after the TTL
    (Redis's own memory limit bounds the size; nothing is kept twice)."""

    def __init__(self, store: RedisStore, ttl: float):
        self.store, self.ttl_ms = store, int(ttl * 1000)

    def client(self) -> Any:
        if self.store.client is None or not self.store.ok:
            raise store_unavailable()
        return self.store.client

    async def keep(self, response_id: str, key_name: str | None, input_items: Items, output_items: Items) -> None:
        if self.ttl_ms <= 0:
            return
        import coredis.exceptions

        try:
            await self.client().set(REDIS_PREFIX + response_id, stored(key_name, input_items, output_items), px=self.ttl_ms)
        except (coredis.exceptions.RedisError, OSError, Refusal) as exc:  # its later references are refused, naming it
            log.warning("response %s was not stored in Redis: %s", response_id, type(exc).__name__)

    async def find(self, response_id: str, key_name: str | None) -> tuple[Items, Items] | None:
        import coredis.exceptions

        client = self.client()
        try:
            value = await client.get(REDIS_PREFIX + response_id)
        except (coredis.exceptions.RedisError, OSError):
            raise store_unavailable() from None
        return None if value is None else of_key(value, key_name)


def response_items(config: Config, store: Store) -> ResponseItems:
    """An app's stored responses: beside its stream store, in Redis when that is Redis."""
    if config.redis_url:  # imported only then, as services.py does: coredis is an optional extra
        from asgi_stream_core.stores.redis import RedisStore

        if isinstance(store, RedisStore):
            return RedisResponseItems(store, config.responses_ttl)
    return MemoryResponseItems(config.responses_ttl)
