"""What one app holds for all of its exchanges, built once from the
configuration at startup: the upstream client, the stream store, the ledger,
the metrics, and admission (the stream limits)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx

from asgi_stream_core.config import Config, ConfigError
from asgi_stream_core.ledger import UsageLedger
from asgi_stream_core.metrics import Metrics
from asgi_stream_core.record import StreamRecord
from asgi_stream_core.stores import Store
from asgi_stream_core.stores.memory import MemoryStore, StreamRegistry
from asgi_stream_core.stores.responses import ResponseItems, response_items
from asgi_stream_core.types import RETRY_SOON, Refusal
from asgi_stream_core.upstream_client import open_client
from providers.breaker import CircuitBreaker
from providers.pools import KeyPool

INDEX_FILE = Path(__file__).resolve().parent.parent / "index.html"


class Admission:
    """The stream limits of this process, then the store's (shared by every
    replica with REDIS_URL). A slot is held from admission until `done`."""

    def __init__(self, config: Config, metrics: Metrics, store: Store):
        self.config, self.metrics, self.store = config, metrics, store
        self.unaccounted = 0  # streams admitted whose ledger row is not queued yet

    def admit(self, key_name: str | None) -> None:
        cfg, metrics = self.config, self.metrics
        if metrics.active >= cfg.max_streams:
            raise Refusal(503, "overloaded", f"the server is at its limit of {cfg.max_streams} streams", RETRY_SOON)
        if cfg.api_keys and metrics.active_by_key.get(key_name, 0) >= cfg.max_streams_per_key:
            raise Refusal(429, "rate_limited", f"this key is at its limit of {cfg.max_streams_per_key} streams", RETRY_SOON)
        metrics.active += 1
        self.unaccounted += 1
        metrics.active_by_key[key_name] = metrics.active_by_key.get(key_name, 0) + 1

    def release(self, key_name: str | None) -> None:
        """At `done`: the slot is free for the key's next stream."""
        self.metrics.active -= 1
        left = self.metrics.active_by_key[key_name] - 1
        if left:
            self.metrics.active_by_key[key_name] = left
        else:
            del self.metrics.active_by_key[key_name]

    async def hold(self, record: StreamRecord) -> None:
        """Take a slot for a new stream: this process's, then the store's."""
        self.admit(record.key_name)
        try:
            await self.store.hold(record)
        except BaseException:  # refused, or cancelled on the way: the slot was not taken
            self.release(record.key_name)
            self.unaccounted -= 1
            raise


@dataclass
class Services:
    config: Config
    http: httpx.AsyncClient
    metrics: Metrics
    registry: StreamRegistry
    store: Store
    ledger: UsageLedger | None
    admission: Admission
    index_page: bytes
    responses: ResponseItems  # /v1/responses' stored items
    key_pools: dict[str, KeyPool] = field(default_factory=dict)  # CONFIG_FILE's upstreams that have keys
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)  # every backend an alias may try


def build_services(config: Config, metrics: Metrics) -> Services:
    registry = StreamRegistry(config.resume_ttl)
    ledger = UsageLedger(config.usage_db) if config.usage_db else None
    store: Store = MemoryStore(registry)
    if config.redis_url:  # imported only when asked for: coredis is an optional extra
        try:
            from asgi_stream_core.stores.redis import RedisStore
        except ImportError as exc:
            raise ConfigError(f"REDIS_URL is set but its client is missing ({exc}): pip install 'asgi-stream[redis]'") from None
        store = RedisStore(config, registry, ledger)
    page = INDEX_FILE.read_bytes() if INDEX_FILE.exists() else b"<!doctype html><title>asgi-stream</title>"
    pools = {name: KeyPool(name, named.keys) for name, named in config.routing.upstreams.items() if named.keys}
    breakers = {name: CircuitBreaker(name) for name in config.upstreams}
    return Services(config, open_client(config), metrics, registry, store, ledger, Admission(config, metrics, store), page,
                    response_items(config, store), pools, breakers)  # fmt: skip
