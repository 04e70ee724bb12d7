"""Where stream records live by default: in this process's memory. The
registry finds held records by id for resume and cancel, and expires them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from asgi_stream_core.record import StreamRecord


class StreamRegistry:
    """Held streams by id, for resume and cancel; finished ones expire."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._streams: dict[str, StreamRecord] = {}
        self._expiry: dict[str, float] = {}
        self._next_sweep = 0.0

    def add(self, record: StreamRecord) -> None:
        self._sweep()
        self._streams[record.id] = record

    def get(self, stream_id: str, key_name: str | None) -> StreamRecord | None:
        self._sweep()
        record = self._streams.get(stream_id)
        return record if record is not None and record.key_name == key_name else None

    def expire_later(self, record: StreamRecord) -> None:
        if self.ttl <= 0:
            self._streams.pop(record.id, None)
        else:
            self._expiry[record.id] = time.monotonic() + self.ttl

    def __len__(self) -> int:
        return len(self._streams)

    def _sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for stream_id in [s for s, t in self._expiry.items() if t <= now]:
            del self._expiry[stream_id]
            self._streams.pop(stream_id, None)


class MemoryStore:
    """The store of one process: limits are the gateway's own counters, and
    every stream it can serve is in its registry."""

    name = "memory"
    ok = True

    def __init__(self, registry: StreamRegistry):
        self.registry = registry

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        yield

    def health(self) -> dict[str, Any]:
        return {}

    async def hold(self, record: StreamRecord) -> None:
        if record.resumable:
            self.registry.add(record)

    async def find(self, stream_id: str, key_name: str | None, position: int) -> StreamRecord | None:
        return self.registry.get(stream_id, key_name)

    async def cancel(self, stream_id: str, key_name: str | None) -> bool:
        record = self.registry.get(stream_id, key_name)
        return record is not None and record.cancel("cancelled")

    def readers(self, record: StreamRecord) -> int:
        return record.readers

    def finished(self, record: StreamRecord) -> None:
        pass
