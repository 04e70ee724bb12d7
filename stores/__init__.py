"""Where stream records live: `memory` (this process, the default) or, with
`REDIS_URL` set, `redis` (shared by every replica). Both offer the same
handful of calls to the gateway (Store); a refusal names its HTTP status."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from stores.memory import StreamRecord


class Refused(Exception):
    """A store cannot take a stream now: the status and error type to answer with."""

    def __init__(self, status: int, type: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type, message
        self.headers = [(b"retry-after", b"1")]


class Store(Protocol):
    """What the gateway asks of a store (docs/scaling.md, "The seam")."""

    def running(self) -> AbstractAsyncContextManager[None]: ...  # from lifespan startup to shutdown
    def health(self) -> dict[str, Any]: ...  # added to /healthz's body
    async def hold(self, record: StreamRecord) -> None: ...  # a new stream, owned here (only its slot unless resumable); may raise Refused
    async def find(self, stream_id: str, key_name: str | None, position: int) -> StreamRecord | None: ...  # to resume
    async def cancel(self, stream_id: str, key_name: str | None) -> bool: ...  # False: no running stream
    def readers(self, record: StreamRecord) -> int: ...  # on every replica
    def finished(self, record: StreamRecord) -> None: ...  # done is written
