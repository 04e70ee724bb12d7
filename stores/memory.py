"""Where stream records live by default: in this process's memory. A record
holds the events of one generation for every client that reads it; the
registry finds held records by id for resume and cancel, and expires them."""

from __future__ import annotations

import time
from array import array
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson

from providers import ChatRequest, UpstreamError
from sse import FRAME_OVERHEAD, frame_data, frame_event

EVENT_NAMES: list[bytes] = []  # what StreamRecord's kind bytes stand for
EVENT_KINDS: dict[str, int] = {}


class StreamRecord:
    """The encoded events of one generation, for every client that reads it.

    Clients are readers; the generation is the only writer. The interface
    (append, read, wait, finish) is all a replica-shared store such as Redis
    Streams would need to provide. Events are held compactly (their data in
    one bytearray, an end offset and a kind byte each) and framed when read:
    ~15 instead of ~70 bytes per token. `max_bytes` bounds what the held
    events take framed (oldest dropped first).
    """

    route = "chat/stream"  # the ledger's name for where the request came in
    resumable = True  # stores make it findable by id (resume, DELETE); otherwise they only count its slot

    def __init__(self, stream_id: str, key_name: str | None, request: ChatRequest, max_bytes: int):
        self.id = stream_id
        self.key_name = key_name
        self.request = request
        self.max_bytes = max_bytes
        self.started = time.time()
        self.started_clock = anyio.current_time()
        self.first_token_after: float | None = None
        self.tokens = 0
        self.readers = 0
        self.ever_disconnected = False
        self.finished = False
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.error: UpstreamError | None = None
        self.cancel_reason: str | UpstreamError | None = None  # an error: the stream ends with it, not as cancelled
        self.generation: anyio.CancelScope | None = None
        self._data = bytearray()  # UTF-8 data of the held events, line breaks already framed
        self._ends = array("Q")  # end offset of each held event's data
        self._kinds = bytearray()  # each held event's index in EVENT_NAMES
        self._first = 0  # events before this were dropped to bound memory
        self._held = 0  # bytes the held events take framed
        self._changed: anyio.Event | None = None
        self._id_prefix = stream_id.encode() + b"."
        self.on_append: Callable[[StreamRecord], None] | None = None  # a shared store's write-behind hears of appends

    @property
    def count(self) -> int:
        return self._first + len(self._ends)

    def append(self, event: str, data: str) -> None:
        self.append_framed(event, frame_data(data))

    def append_framed(self, event: str, framed: bytes) -> None:
        """Append an event whose data frame_data already made (a replica's copy)."""
        kind = EVENT_KINDS.get(event)
        if kind is None:  # names come from code, not from input: a handful
            kind = EVENT_KINDS[event] = len(EVENT_NAMES)
            EVENT_NAMES.append(event.encode())
        start = len(self._data)
        self._data += framed
        self._ends.append(len(self._data))
        self._kinds.append(kind)
        self._held += self._framed_size(kind, self.count, len(self._data) - start)
        if self._held > self.max_bytes:
            self._drop_oldest()
        if self.on_append is not None:
            self.on_append(self)
        self.notify()

    def _framed_size(self, kind: int, number: int, data_size: int) -> int:
        return FRAME_OVERHEAD + len(EVENT_NAMES[kind]) + len(self._id_prefix) + len(str(number)) + data_size

    def _drop_oldest(self) -> None:
        """Drop the oldest events (never the last) until at most half the bound is held."""
        excess, dropped, freed, cut = self._held - self.max_bytes // 2, 0, 0, 0
        while dropped < len(self._ends) - 1:
            size = self._framed_size(self._kinds[dropped], self._first + dropped + 1, self._ends[dropped] - cut)
            if freed + size > excess:
                break
            freed, cut, dropped = freed + size, self._ends[dropped], dropped + 1
        if dropped:
            del self._data[:cut], self._kinds[:dropped]
            self._ends = array("Q", [end - cut for end in self._ends[dropped:]])
            self._first += dropped
            self._held -= freed

    def read(self, position: int) -> bytes | None:
        """Every event after the first `position` as one bytes (b"" if none
        yet); None if some of them were dropped and cannot be replayed."""
        if position < self._first:
            return None
        if position >= self.count:
            return b""
        held = position - self._first
        start = self._ends[held - 1] if held else 0
        frames = []
        for i in range(held, len(self._ends)):
            end = self._ends[i]
            name, data = EVENT_NAMES[self._kinds[i]], self._data[start:end]
            frames.append(frame_event(name, b"%b%d" % (self._id_prefix, self._first + i + 1), data))
            start = end
        return b"".join(frames)

    def events(self, position: int) -> list[tuple[str, str]] | None:
        """The held events after `position` as (name, framed data); None if some were dropped."""
        if position < self._first:
            return None
        held, events = position - self._first, []
        start = self._ends[held - 1] if held else 0
        for i in range(held, len(self._ends)):
            events.append((EVENT_NAMES[self._kinds[i]].decode(), self._data[start:self._ends[i]].decode()))
            start = self._ends[i]
        return events

    @property
    def first(self) -> int:
        """Events up to this position were dropped to bound memory."""
        return self._first

    def skip_to(self, position: int) -> None:
        """Hold nothing before `position`: a replica's copy starts where its reader resumes."""
        del self._data[:], self._kinds[:]
        self._ends = array("Q")
        self._first, self._held = position, 0

    def holds_position(self, position: int) -> bool:
        return self._first <= position <= self.count

    async def wait(self) -> None:
        """Until something is appended, a reader comes or goes, or it ends."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def cancel(self, reason: str | UpstreamError) -> bool:
        """Stop the generation (DELETE, or no reader after the grace), even one not started yet;
        with an error as the reason, the stream ends with that error."""
        if self.finished:
            return False
        self.cancel_reason = reason
        if self.generation is not None:
            self.generation.cancel()
        return True

    def finish(self, finish_reason: str, usage: dict[str, Any] | None, error: UpstreamError | None) -> None:
        """Append the closing events: usage?, error?, done; exactly once."""
        if self.finished:
            return
        self.finish_reason, self.usage, self.error = finish_reason, usage, error
        if usage is not None:
            self.append("usage", orjson.dumps(usage).decode())
        if error is not None:
            self.append("error", orjson.dumps(error.as_event_data()).decode())
        self.append("done", finish_reason)
        self.finished = True
        self.notify()


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
