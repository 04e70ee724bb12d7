"""Where stream records live: `memory` (this process, the default) or, with
`REDIS_URL` set, `redis` (shared by every replica). Both offer the same
handful of calls to the gateway (Store); a refusal is a Refusal, with its HTTP status."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from asgi_stream_core.record import StreamRecord


class Store(Protocol):
    """What the gateway asks of a store (docs/scaling.md, "The seam")."""

    def running(self) -> AbstractAsyncContextManager[None]: ...  # from lifespan startup to shutdown
    def health(self) -> dict[str, Any]: ...  # added to /healthz's body
    async def hold(self, record: StreamRecord) -> None: ...  # a new stream, owned here (only its slot unless resumable); may raise Refusal
    async def find(self, stream_id: str, key_name: str | None, position: int) -> StreamRecord | None: ...  # to resume
    async def cancel(self, stream_id: str, key_name: str | None) -> bool: ...  # False: no running stream
    def readers(self, record: StreamRecord) -> int: ...  # on every replica
    def finished(self, record: StreamRecord) -> None: ...  # done is written
