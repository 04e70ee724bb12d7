"""The stream record: one generation's events for every client that reads
it. A thin async layer over the pure EventLog: waiting for what comes next,
cancel, and the ending. The generation is its only writer; readers read it
through its framer, which turns held events into their protocol's bytes
(SSE with ids here; OpenAI's chunks in openai_api.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
import orjson

from asgi_stream_core.event_log import EventLog
from asgi_stream_core.sse import FIRST_CHUNK, frame_data, opening_chunk
from providers import ChatRequest, UpstreamError


class Framer(Protocol):
    """How a record's events are held (`encode`, once per append) and read
    (`frame`, once per read); `resumable`: its frames carry ids to resume from."""

    resumable: bool

    def encode(self, data: str) -> bytes: ...
    def decode(self, encoded: bytes | bytearray) -> str: ...
    def frame(self, record: StreamRecord, position: int) -> bytes | None: ...
    def opening(self, record: StreamRecord) -> bytes: ...


class SSEFramer:
    """The gateway's own contract: `event:`, `id: <stream>.<n>`, `data:` lines."""

    resumable = True

    @staticmethod
    def encode(data: str) -> bytes:
        return frame_data(data)

    @staticmethod
    def decode(encoded: bytes | bytearray) -> str:
        """The text frame_data was given, as a client reads it (line breaks as LF)."""
        return bytes(encoded).replace(b"\ndata: ", b"\n").decode("utf-8", "replace")

    @staticmethod
    def frame(record: StreamRecord, position: int) -> bytes | None:
        return record.log.sse(position, record.id_prefix)

    @staticmethod
    def opening(record: StreamRecord) -> bytes:
        return opening_chunk(record.id)


SSE = SSEFramer()


class Change:
    """A record's next change, for the tasks that wait for it (its readers, the
    resume grace): anyio.Event's `wait` and `set`, made once per change and
    dropped when set. An asyncio task parks on a bare future of its own
    (~0.5 KiB in all); an anyio.Event there is an asyncio.Event, whose deque
    block alone is 760 B, and two more coroutine frames: 1.7 KiB for every
    open stream, whose writer is parked here between tokens
    (bench/stream_memory.py, 500 streams: 49.5-50.2 -> 47.6-49.0 KiB per
    stream; 19 k fewer instructions per spaced token). Not in an asyncio
    task (trio), an anyio.Event."""

    __slots__ = ("_event", "_futures")

    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] = []
        self._event: anyio.Event | None = None

    async def wait(self) -> None:
        if not in_asyncio_task():
            if self._event is None:
                self._event = anyio.Event()
            return await self._event.wait()
        future = asyncio.get_running_loop().create_future()
        self._futures.append(future)
        try:
            await future  # a cancel scope's cancel lands here as on any asyncio future
        except BaseException:
            self._futures.remove(future)  # cancelled: set() has nothing more to wake
            raise

    def set(self) -> None:
        for future in self._futures:
            if not future.done():  # a waiter cancelled in the same loop turn
                future.set_result(None)
        if self._event is not None:
            self._event.set()


def in_asyncio_task() -> bool:
    """Whether the caller runs in an asyncio task, where a bare future can be
    awaited (not under trio, guest mode on an asyncio loop included)."""
    try:
        return asyncio.current_task() is not None
    except RuntimeError:  # no asyncio loop in this thread
        return False


class StreamRecord:
    """The events of one generation, for every client that reads it, and what
    the ledger row will say of it (filled in by the generation and readers)."""

    # One per open stream: slots, not a __dict__ (64 B less each)
    __slots__ = ("_changed", "_encode", "_frame", "_readers_changed", "attempts", "cancel_reason", "cut", "error",
                 "ever_disconnected", "finish_reason", "finished", "first_token_after", "framer", "generation", "id",
                 "id_prefix", "key_name", "log", "on_append", "readers", "request", "resumable", "route", "served",
                 "started", "started_clock", "tokens", "usage")  # fmt: skip

    def __init__(self, stream_id: str, key_name: str | None, request: ChatRequest, max_bytes: int,
                 framer: Framer = SSE, route: str = "chat/stream"):  # fmt: skip
        self.id = stream_id
        self.key_name = key_name
        self.request = request
        self.framer = framer
        self.route = route  # the ledger's name for where the request came in
        self.resumable = framer.resumable  # stores make it findable by id (resume, DELETE); else they only count its slot
        self.id_prefix = stream_id.encode() + b"."
        self.log = EventLog(max_bytes, len(self.id_prefix))
        self.started = time.time()
        self.started_clock = anyio.current_time()
        self.first_token_after: float | None = None
        self.tokens = 0
        self.attempts = 0  # through an alias: the targets tried (0 for a plain backend, whose retries are its own)
        self.served: tuple[str, str] | None = None  # through an alias: the (upstream, model) that served
        self.readers = 0
        self.ever_disconnected = False
        self.finished = False
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.error: UpstreamError | None = None
        self.cancel_reason: str | UpstreamError | None = None  # an error: the stream ends with it, not as cancelled
        self.cut = False  # past its bound, a record that drops nothing stops its generation (bound): it ends `length`
        self.generation: anyio.CancelScope | None = None
        self._changed: Change | None = None
        self._readers_changed: Change | None = None  # its own event: a reader coming or going wakes no writer
        self._encode, self._frame = framer.encode, framer.frame  # looked up once: used at every token
        self.on_append: Callable[[StreamRecord], None] | None = None  # a shared store's write-behind hears of appends

    @property
    def count(self) -> int:
        return self.log.count

    @property
    def first(self) -> int:
        """Events up to this position were dropped to bound memory."""
        return self.log.first

    def holds_position(self, position: int) -> bool:
        return self.log.holds(position)

    def append(self, event: str, data: str) -> None:
        self.log.append(event, self._encode(data))
        if self.on_append is not None:
            self.on_append(self)
        self.notify()

    def append_encoded(self, event: str, encoded: bytes) -> None:
        """Append an event whose data the framer already encoded (a replica's copy)."""
        self.log.append(event, encoded)
        if self.on_append is not None:
            self.on_append(self)
        self.notify()

    def read(self, position: int) -> bytes | None:
        """Every event after the first `position`, framed, as one bytes (b"" if
        none yet); None if some of them were dropped and cannot be replayed."""
        return self._frame(self, position)

    def opening(self) -> bytes:
        """A new response's first bytes."""
        return self.framer.opening(self)

    def resumed_opening(self) -> bytes:
        """A resumed response's first bytes: no `stream` event, whose position 0
        would move the browser's Last-Event-ID back."""
        return FIRST_CHUNK

    def text(self) -> str:
        """The answer text held (every `token`): what a turn's message carries."""
        tokens = [data for name, _, data in self.log.entries(self.log.first) or () if name == b"token"]
        return "".join(map(self.framer.decode, tokens))

    def events(self, position: int) -> list[tuple[str, str]] | None:
        """The held events after `position` as (name, encoded data); None if some were dropped."""
        entries = self.log.entries(position)
        return None if entries is None else [(name.decode(), data.decode()) for name, _, data in entries]

    def skip_to(self, position: int) -> None:
        self.log.skip_to(position)

    def wait(self) -> Awaitable[None]:
        """Until something is appended, or it ends (or a reader's heartbeat is due).
        Change.wait's own coroutine, without one of ours around it (192 B per parked writer)."""
        if self._changed is None:
            self._changed = Change()
        return self._changed.wait()

    def notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def wait_readers(self) -> Awaitable[None]:
        """Until a reader comes or goes (on any replica), or it ends: what the
        resume grace and a replica's reader announcements wait on. Readers
        themselves never wait on it, so attaching or detaching one is O(1)."""
        if self._readers_changed is None:
            self._readers_changed = Change()
        return self._readers_changed.wait()

    def readers_changed(self) -> None:
        if self._readers_changed is not None:
            self._readers_changed.set()
            self._readers_changed = None

    def bound(self, max_bytes: int, *, whole: bool) -> None:
        """Hold at most `max_bytes` of events (framed as SSE). Past it the oldest
        are dropped, and a reader behind them ends; or, for a record whose whole
        text is needed (a non-streaming answer, the Responses API's stored items),
        nothing is dropped and the generation is cut there, ending `length`."""
        self.log.max_bytes = max_bytes
        self.log.on_full = self._cut if whole else None

    def _cut(self) -> None:
        """Stop the generation, to end `length`. Not a cancel reason: the generation's
        scope is cancelled and lands inside the upstream read, which closes it cleanly."""
        if not self.cut and not self.finished and self.generation is not None:
            self.cut = True
            self.generation.cancel()

    def cancel(self, reason: str | UpstreamError) -> bool:
        """Stop the generation (DELETE, or no reader after the grace), even one not started yet;
        with an error as the reason, the stream ends with that error."""
        if self.finished:
            return False
        self.cancel_reason = reason
        if self.generation is not None:
            self.generation.cancel()
        return True

    def finish(self, finish_reason: str, usage: dict[str, Any] | None, error: UpstreamError | None,
               message: dict[str, Any] | None = None) -> None:  # fmt: skip
        """Append the closing events: message?, usage?, error?, done; exactly once."""
        if self.finished:
            return
        self.finish_reason, self.usage, self.error = finish_reason, usage, error
        if message is not None:
            self.append("message", orjson.dumps(message).decode())
        if usage is not None:
            self.append("usage", orjson.dumps(usage).decode())
        if error is not None:
            self.append("error", orjson.dumps(error.as_event_data()).decode())
        self.append("done", finish_reason)
        self.finished = True
        self.notify()
        self.readers_changed()
