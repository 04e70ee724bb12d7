"""The event log under a stream record: what one generation produced, held
compactly for every reader, bounded, and read back from any position.
Pure: no clock, no task, no request; property-tested on its own
(tests/test_stream_log.py), like the SSE framing.

Events are numbered from 1 (0 is the `stream` event, which is never held).
Each is a name and its data, held as bytes: the data of all in one
bytearray, an end offset and a name index each, ~15 instead of ~70 bytes per
token. The bound counts what the held events take framed as SSE, the most
any framer writes (`STREAM_BUFFER_BYTES`); past it the oldest are dropped,
never the last, down to half the bound, so that drops come in batches."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator

from asgi_stream_core.sse import FRAME_OVERHEAD, frame_event

EVENT_NAMES: list[bytes] = []  # what a held event's name index stands for, in every log
EVENT_INDEX: dict[str, int] = {}


def name_index(event: str) -> int:
    index = EVENT_INDEX.get(event)
    if index is None:  # names come from code, not from input: a handful
        index = EVENT_INDEX[event] = len(EVENT_NAMES)
        EVENT_NAMES.append(event.encode())
    return index


class EventLog:
    """Numbered events with their data, oldest dropped past `max_bytes`."""

    __slots__ = ("_data", "_ends", "_first", "_held", "_id_size", "_names", "max_bytes", "on_full")

    def __init__(self, max_bytes: int, id_prefix_size: int):
        self.max_bytes = max_bytes
        self._id_size = id_prefix_size  # `<stream>.` before each event's number, in its SSE id
        self._data = bytearray()  # the held events' data, one after another
        self._ends = array("Q")  # end offset of each held event's data
        self._names = bytearray()  # each held event's index in EVENT_NAMES
        self._first = 0  # events up to this number were dropped
        self._held = 0  # bytes the held events take framed
        self.on_full: Callable[[], None] | None = None  # set: past the bound nothing is dropped, this is called instead

    @property
    def count(self) -> int:
        """The number of the last event appended (0: none yet)."""
        return self._first + len(self._ends)

    @property
    def first(self) -> int:
        """Events up to this number were dropped to bound memory."""
        return self._first

    def holds(self, position: int) -> bool:
        """Whether every event after `position` can still be read."""
        return self._first <= position <= self.count

    def append(self, event: str, data: bytes) -> None:
        name = EVENT_INDEX.get(event)
        if name is None:
            name = name_index(event)
        self._data += data
        self._ends.append(len(self._data))
        self._names.append(name)
        # the new event's number spelled out, not through `count`: a property costs a call per token
        self._held += self._framed_size(name, self._first + len(self._ends), len(data))
        if self._held > self.max_bytes:
            self._drop_oldest()

    def entries(self, position: int) -> Iterator[tuple[bytes, int, bytearray]] | None:
        """(name, number, data) of every event after `position`; None if some were dropped."""
        if position < self._first:
            return None
        return self._entries(position - self._first)

    def sse(self, position: int, id_prefix: bytes) -> bytes | None:
        """Every event after `position` framed as SSE with ids `<id_prefix><n>`, as
        one bytes; None if some were dropped. `entries` framed by the caller would
        do the same at 3% more instructions per token (bench/instructions.py)."""
        if position < self._first:
            return None
        held = position - self._first
        start = self._ends[held - 1] if held else 0
        frames = []
        for i in range(held, len(self._ends)):
            end = self._ends[i]
            frames.append(frame_event(EVENT_NAMES[self._names[i]], b"%b%d" % (id_prefix, self._first + i + 1), self._data[start:end]))
            start = end
        return b"".join(frames)

    def _entries(self, held: int) -> Iterator[tuple[bytes, int, bytearray]]:
        start = self._ends[held - 1] if held else 0
        for i in range(held, len(self._ends)):
            end = self._ends[i]
            yield EVENT_NAMES[self._names[i]], self._first + i + 1, self._data[start:end]
            start = end

    def skip_to(self, position: int) -> None:
        """Hold nothing up to `position`: a replica's copy starts where its reader resumes."""
        del self._data[:], self._names[:]
        self._ends = array("Q")
        self._first, self._held = position, 0

    def _framed_size(self, name: int, number: int, data_size: int) -> int:
        return FRAME_OVERHEAD + len(EVENT_NAMES[name]) + self._id_size + len(str(number)) + data_size

    def _drop_oldest(self) -> None:
        """Drop the oldest events (never the last) until at most half the bound is held."""
        if self.on_full is not None:
            return self.on_full()
        excess, dropped, freed, cut = self._held - self.max_bytes // 2, 0, 0, 0
        while dropped < len(self._ends) - 1:
            size = self._framed_size(self._names[dropped], self._first + dropped + 1, self._ends[dropped] - cut)
            if freed + size > excess:
                break
            freed, cut, dropped = freed + size, self._ends[dropped], dropped + 1
        if dropped:
            del self._data[:cut], self._names[:dropped]
            self._ends = array("Q", [end - cut for end in self._ends[dropped:]])
            self._first += dropped
            self._held -= freed
