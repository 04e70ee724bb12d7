"""SSE framing (WHATWG HTML, "Server-sent events"): the bytes a client's
parser turns back into exactly the events we meant. Pure functions, written
by hand by design, and property-tested against independent parsers."""

from __future__ import annotations

import re

SAFE_FIELD = re.compile(r"[!-~]+")  # printable ASCII, no space: no CR, LF or NUL
LINE_BREAK = re.compile(r"\r\n|\r|\n")
HEARTBEAT = b":\n"  # one comment line, no blank line: dispatches nothing anywhere
FIRST_CHUNK = b"retry: 1000\n"  # gets the headers out on servers that hold them


def encode_event(event: str, data: str, event_id: str) -> bytes:
    """One complete SSE event; event names and ids that would break the
    framing are refused."""
    if not SAFE_FIELD.fullmatch(event) or not SAFE_FIELD.fullmatch(event_id):
        raise ValueError("event names and ids must be printable ASCII without spaces")
    return frame_event(event.encode(), event_id.encode(), frame_data(data))


def opening_chunk(stream_id: str) -> bytes:
    """A new stream's first bytes: FIRST_CHUNK and a `stream` event, id
    `<stream>.0`, so a page learns the id before any token (to stop it). A
    resumed response sends FIRST_CHUNK alone: position 0 would move the
    browser's Last-Event-ID back."""
    return FIRST_CHUNK + encode_event("stream", stream_id, f"{stream_id}.0")


def frame_data(data: str) -> bytes:
    """Event data as the payload of `data:` lines: one line per line of text
    (the receiver joins them with LF), in UTF-8."""
    if "\n" in data or "\r" in data:
        data = "\ndata: ".join(LINE_BREAK.split(data))
    return data.encode("utf-8", "replace")  # lone surrogates (possible from JSON escapes) cannot be UTF-8


def frame_event(event: bytes, event_id: bytes, data: bytes | bytearray) -> bytes:
    """An event from its parts, `data` as frame_data made it."""
    return b"event: %b\nid: %b\ndata: %b\n\n" % (event, event_id, data)  # type: ignore[str-format]  # %b takes a bytearray too


FRAME_OVERHEAD = len(frame_event(b"", b"", b""))
