"""StreamRecord holds events compactly and frames them when read: what a
reader gets must be exactly the bytes the plain design (every event framed
with encode_event into one buffer, the same drop rule) would give."""

from __future__ import annotations

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_stream_core import sse
from asgi_stream_core.event_log import EventLog
from asgi_stream_core.record import StreamRecord
from providers import ChatRequest

REQUEST = ChatRequest([{"role": "user", "content": "hi"}], "echo", "echo", 16)


class PlainRecord:
    """The reference: framed events in one list, oldest dropped past the bound."""

    def __init__(self, stream_id: str, max_bytes: int):
        self.stream_id, self.max_bytes = stream_id, max_bytes
        self.frames: list[bytes] = []
        self.first = 0

    def append(self, event: str, data: str) -> None:
        self.frames.append(sse.encode_event(event, data, f"{self.stream_id}.{self.first + len(self.frames) + 1}"))
        held = sum(map(len, self.frames))
        if held > self.max_bytes:
            excess, freed, dropped = held - self.max_bytes // 2, 0, 0
            while dropped < len(self.frames) - 1 and freed + len(self.frames[dropped]) <= excess:
                freed += len(self.frames[dropped])
                dropped += 1
            del self.frames[:dropped]
            self.first += dropped

    def read(self, position: int) -> bytes | None:
        if position < self.first:
            return None
        return b"".join(self.frames[position - self.first :])


pieces = st.text(max_size=8) | st.sampled_from(["\n", "\r", "\r\n", "\ud800", "é", "🙂", " w1"])
texts = st.lists(pieces, max_size=5).map("".join)
events = st.lists(st.tuples(st.sampled_from(["token", "token", "token", "usage", "error", "done", "custom"]), texts), max_size=120)


@settings(max_examples=300, deadline=None)
@given(events=events, max_bytes=st.integers(60, 3000), stream_id=st.sampled_from(["s", "AbC-_x9" * 3]))
def test_reads_give_the_same_bytes_as_framing_every_event_up_front(events: list[tuple[str, str]], max_bytes: int, stream_id: str) -> None:
    async def check() -> None:
        record = StreamRecord(stream_id, None, REQUEST, max_bytes)
        plain = PlainRecord(stream_id, max_bytes)
        for event, data in events:
            record.append(event, data)
            plain.append(event, data)
            for position in {0, plain.first, max(0, record.count - 3), record.count}:
                assert record.read(position) == plain.read(position)
                assert record.holds_position(position) == (plain.first <= position <= record.count)

    anyio.run(check)


@settings(max_examples=300, deadline=None)
@given(events=events, max_bytes=st.integers(60, 3000), stream_id=st.sampled_from(["s", "AbC-_x9" * 3]))
def test_the_pure_event_log_holds_what_the_plain_design_holds_within_its_bound(
    events: list[tuple[str, str]], max_bytes: int, stream_id: str
) -> None:
    """No event loop: the log alone, framed as SSE, against the plain design
    (the same events held, the same numbers, the same drop rule)."""
    log, plain, prefix = EventLog(max_bytes, len(stream_id) + 1), PlainRecord(stream_id, max_bytes), stream_id.encode() + b"."
    for event, data in events:
        log.append(event, sse.frame_data(data))
        plain.append(event, data)
        assert (log.count, log.first) == (plain.first + len(plain.frames), plain.first)
        entries = log.entries(log.first)
        assert entries is not None and log.entries(log.first - 1) is None if log.first else entries is not None
        framed = b"".join(sse.frame_event(name, b"%b%d" % (prefix, n), data) for name, n, data in entries)
        assert framed == plain.read(plain.first)


def test_a_held_stream_of_short_tokens_takes_about_fifteen_bytes_per_token() -> None:
    async def check() -> None:
        record = StreamRecord("x" * 22, None, REQUEST, 1 << 20)
        for i in range(1000):
            record.append("token", f" w{i % 100}")
        framed = len(record.read(0) or b"")
        log = record.log
        held = len(log._data) + log._ends.itemsize * len(log._ends) + len(log._names)
        assert framed > 50_000 and held < 15_000

    anyio.run(check)
