"""The shared upstream decoders (providers/lines.py): the SSE conformance
vectors, and properties over arbitrary splits of a byte stream into network
reads."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from providers.lines import MAX_LINE_BYTES, LineSplitter, LineTooLong, SSEDecoder, SSEEvent, split_ndjson

VECTORS = [json.loads(line) for line in (Path(__file__).with_name("sse-vectors.jsonl")).read_text().splitlines() if line.strip()]


def vector_bytes(vector: dict[str, Any]) -> bytes:
    return bytes.fromhex(vector["input_hex"]) if "input_hex" in vector else vector["input"].encode("utf-8")


def chunkings(vector: dict[str, Any]) -> dict[str, list[bytes]]:
    whole = vector_bytes(vector)
    ways = {"whole": [whole], "bytewise": [whole[i : i + 1] for i in range(len(whole))]}
    if isinstance(vector.get("chunks"), list):
        ways["own"] = [chunk.encode("utf-8") for chunk in vector["chunks"]]
        assert b"".join(ways["own"]) == whole
    return ways


def decode(pieces: list[bytes], lenient: bool = False) -> tuple[list[SSEEvent], SSEDecoder]:
    decoder = SSEDecoder()
    events = [event for piece in pieces for event in decoder.feed(piece)]
    return events + decoder.finish(lenient), decoder


def readable(events: list[SSEEvent]) -> list[dict[str, str]]:
    return [{"event": e.event, "data": e.data.decode("utf-8", "replace"), "id": e.id} for e in events]


CASES = [(vector, way) for vector in VECTORS for way in chunkings(vector)]


@pytest.mark.parametrize(("vector", "chunking"), CASES, ids=[f"{v['name']}-{way}" for v, way in CASES])
def test_sse_decoder_passes_the_conformance_vector(vector: dict[str, Any], chunking: str) -> None:
    events, decoder = decode(chunkings(vector)[chunking])
    assert readable(events) == vector["events"]
    assert decoder.retry == vector["retry"]


def test_the_vectors_cover_the_cases_they_are_meant_to() -> None:
    assert len(VECTORS) == 73
    assert any("input_hex" in v for v in VECTORS)
    assert any(isinstance(v.get("chunks"), list) for v in VECTORS)


# --- properties over splits --------------------------------------------------------

LINE_ENDS = st.sampled_from([b"\n", b"\r", b"\r\n"])
ONE_LINE_TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=12)
VALUE = ONE_LINE_TEXT.map(lambda s: s.encode("utf-8"))
FIELD = st.sampled_from([b"data: ", b"data:", b"data", b"event: ", b"id: ", b"id:", b"retry: ", b"error: ", b":", b"", b"x: "])
SSE_LINE = st.tuples(FIELD, VALUE, LINE_ENDS).map(b"".join)
SSE_STREAM = st.tuples(st.sampled_from([b"", b"\xef\xbb\xbf"]), st.lists(st.one_of(SSE_LINE, LINE_ENDS), max_size=25)).map(
    lambda t: t[0] + b"".join(t[1])
)
ANY_BYTES = st.one_of(SSE_STREAM, st.binary(max_size=200))


@st.composite
def split(draw: st.DrawFn, stream: st.SearchStrategy[bytes]) -> tuple[bytes, list[bytes]]:
    """A byte stream and one way of cutting it into network reads (empty reads included)."""
    whole = draw(stream)
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=12)))
    bounds = [0, *cuts, len(whole)]
    return whole, [whole[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400)
@given(case=split(ANY_BYTES), lenient=st.booleans())
def test_any_split_of_a_byte_stream_decodes_as_the_whole(case: tuple[bytes, list[bytes]], lenient: bool) -> None:
    whole, pieces = case
    whole_events, whole_decoder = decode([whole], lenient)
    split_events, split_decoder = decode(pieces, lenient)
    assert split_events == whole_events
    assert (split_decoder.retry, split_decoder.last_event_id, split_decoder.error_field) == (
        whole_decoder.retry,
        whole_decoder.last_event_id,
        whole_decoder.error_field,
    )


WHOLE_DATA_EVENT = VALUE.map(lambda value: b"data: " + value + b"\n\n")  # as OpenAI-style servers send each chunk


@settings(max_examples=400)
@given(pieces=st.lists(st.one_of(WHOLE_DATA_EVENT, SSE_LINE, LINE_ENDS, st.just(b"\xef\xbb\xbf")), max_size=25))
def test_reads_of_one_whole_event_each_decode_as_the_whole(pieces: list[bytes]) -> None:
    """The decoder's fast path (a read that is exactly one `data:` event) gives
    what the line-by-line path gives, whatever came before it: a line cut
    short, an event name, data lines not yet dispatched, a BOM, an id."""
    whole_events, whole_decoder = decode([b"".join(pieces)])
    read_events, read_decoder = decode(pieces)
    assert read_events == whole_events
    assert read_decoder.last_event_id == whole_decoder.last_event_id


NDJSON_LINE = st.tuples(
    st.sampled_from([b"", b"  ", b'{"a": ']), VALUE, st.sampled_from([b"", b"}", b" \t"]), LINE_ENDS
).map(b"".join)


def ndjson(pieces: list[bytes]) -> list[bytes]:
    splitter = LineSplitter()
    return [line for piece in pieces for line in split_ndjson(splitter, piece)] + split_ndjson(splitter, None)


@settings(max_examples=300)
@given(case=split(st.one_of(st.lists(NDJSON_LINE, max_size=20).map(b"".join), st.binary(max_size=200))))
def test_any_split_of_an_ndjson_stream_gives_the_same_lines(case: tuple[bytes, list[bytes]]) -> None:
    whole, pieces = case
    lines = ndjson(pieces)
    assert lines == ndjson([whole])
    assert all(line.strip() for line in lines)  # blank lines are skipped
    assert all(b"\r" not in line and b"\n" not in line for line in lines)


def test_ndjson_keeps_an_unterminated_last_line_and_skips_blank_ones() -> None:
    assert ndjson([b'{"a":1}\r\n\n  \r{"b"', b':2}']) == [b'{"a":1}', b'{"b":2}']


@settings(max_examples=200)
@given(before=VALUE, after=VALUE, separator=st.sampled_from(["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1e"]))
def test_unicode_line_separators_never_end_a_line(before: bytes, after: bytes, separator: str) -> None:
    data = before + separator.encode() + after
    stream = b"data: " + data + b"\n\n"
    for pieces in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
        events, _ = decode(pieces)
        assert events == [SSEEvent("message", data, "")]


def test_a_crlf_split_across_two_reads_is_one_line_end() -> None:
    events, _ = decode([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert events == [SSEEvent("message", b"a\nb", "")]
    splitter = LineSplitter()
    assert splitter.feed(b"x\r") == [b"x"]
    assert splitter.feed(b"") == []  # an empty read does not forget the pending CR
    assert splitter.feed(b"\ny\n") == [b"y"]


def test_a_cr_then_a_cr_in_the_next_read_are_two_line_ends() -> None:
    events, _ = decode([b"data: a\r", b"\r"])
    assert events == [SSEEvent("message", b"a", "")]


def test_utf8_characters_cut_between_reads_arrive_whole() -> None:
    stream = "data: é😀\u2028x\n\n".encode()
    events, _ = decode([stream[i : i + 1] for i in range(len(stream))])
    assert events[0].data.decode("utf-8") == "é😀\u2028x"


# --- end of stream ----------------------------------------------------------------


@pytest.mark.parametrize("tail", [b"data: [DONE]", b"data: [DONE]\n", b"data: [DONE]\r"])
def test_lenient_finish_dispatches_an_unterminated_final_event(tail: bytes) -> None:
    strict, _ = decode([b"data: 1\n\n", tail])
    lenient, _ = decode([b"data: 1\n\n", tail], lenient=True)
    assert strict == [SSEEvent("message", b"1", "")]
    assert lenient == [SSEEvent("message", b"1", ""), SSEEvent("message", b"[DONE]", "")]


def test_lenient_finish_dispatches_nothing_when_no_data_is_pending() -> None:
    assert decode([b"data: 1\n\nevent: x\n"], lenient=True)[0] == [SSEEvent("message", b"1", "")]


def test_the_error_field_of_old_llama_cpp_is_kept_for_the_provider() -> None:
    events, decoder = decode([b"error: {\"message\": \"boom\"}\n\n"])
    assert events == [] and decoder.error_field == b'{"message": "boom"}'


def test_ids_persist_and_a_nul_id_is_ignored() -> None:
    events, decoder = decode([b"id: 7\ndata: a\n\ndata: b\n\nid: x\0y\ndata: c\n\nid\ndata: d\n\n"])
    assert [e.id for e in events] == ["7", "7", "7", ""]
    assert decoder.last_event_id == b""


# --- limits ----------------------------------------------------------------------


def test_a_line_longer_than_max_line_fails_with_line_too_long() -> None:
    splitter = LineSplitter(max_line=10)
    assert splitter.feed(b"x" * 10) == []  # exactly the limit is fine
    with pytest.raises(LineTooLong, match="10 bytes"):
        splitter.feed(b"x")
    decoder = SSEDecoder(max_line=8)
    decoder.feed(b"data: 12\n")
    with pytest.raises(LineTooLong):
        for _ in range(3):
            decoder.feed(b"data: ")


def test_the_default_line_limit_is_4_mib() -> None:
    assert MAX_LINE_BYTES == 4 * 1024 * 1024
    assert LineSplitter().max_line == MAX_LINE_BYTES
