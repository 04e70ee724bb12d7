"""SSE framing: `encode_event` and the stream record, checked against two
independent parsers (httpx-sse in process, npm eventsource-parser@4 through
Node) and against the event-stream contract of docs/design.md.

Policy stated here: data is sent as UTF-8; a lone surrogate (possible from a
JSON `\\ud800` escape) cannot be UTF-8 and is sent as `?`. CR, LF and CRLF in
data all become LF, which SSE does anyway. Nothing else may change.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from httpx_sse import EventSource
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_stream import Gateway
from asgi_stream_core.generation import Generation
from asgi_stream_core.record import StreamRecord
from asgi_stream_core.sse import encode_event
from providers import ChatRequest, Chunk, Final, Upstream, UpstreamError

NODE_ORACLE = Path(__file__).with_name("node") / "sse_oracle.mjs"
REQUEST = ChatRequest([{"role": "user", "content": "hi"}], "echo", "echo", 100)

# Pieces that stress framing, mixed with arbitrary text (surrogates included).
AWKWARD = st.sampled_from(["\r", "\n", "\r\n", "\n\r", " ", "  ", ":", "data:", "data: x", "id: 9", "event: e",
                           "retry: 1", "\0", "\u2028", "\u2029", "\u0085", "\ufeff", "\x0b", "\x0c", "é", "😀", "\ud800"])
TEXT = st.lists(st.one_of(AWKWARD, st.text()), max_size=12).map("".join)
SAFE_NAME = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)


def expected_data(text: str) -> str:
    """What any SSE client must read back from our encoding of `text`."""
    return re.sub(r"\r\n|\r", "\n", text).encode("utf-8", "replace").decode("utf-8")


def parse_httpx_sse(body: bytes) -> list[tuple[str, str, str]]:
    response = httpx.Response(200, headers={"content-type": "text/event-stream; charset=utf-8"}, content=body)
    return [(e.event, e.data, e.id) for e in EventSource(response).iter_sse()]


def parse_node(bodies: list[bytes]) -> list[list[tuple[str, str, str]]]:
    """All bodies through eventsource-parser in one Node process (one per batch)."""
    stdin = "".join(json.dumps(base64.b64encode(b).decode()) + "\n" for b in bodies)
    done = subprocess.run(["node", str(NODE_ORACLE)], input=stdin, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"node oracle failed (run `npm ci --prefix tests/node`): {done.stderr}"
    lines = done.stdout.split("\n")[:-1]  # not splitlines: U+2028 comes through raw
    assert len(lines) == len(bodies)
    return [[(e["event"], e["data"], e["id"]) for e in json.loads(line)] for line in lines]


def assert_node_agrees(cases: list[tuple[bytes, list[tuple[str, str, str]]]]) -> None:
    """Every (body, expected events) pair, parsed by Node; the shortest failure is reported."""
    results = parse_node([body for body, _ in cases])
    failures = sorted((len(body), body, want, got) for (body, want), got in zip(cases, results) if got != want)
    assert not failures, f"eventsource-parser disagrees on {len(failures)} cases; shortest: {failures[0][1:]}"


# --- encode_event ---------------------------------------------------------------


def test_encode_event_frames_one_complete_event_with_one_data_line_per_line() -> None:
    assert encode_event("token", "a\r\nb\rc\nd", "s.1") == b"event: token\nid: s.1\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    assert encode_event("done", "", "s.2") == b"event: done\nid: s.2\ndata: \n\n"


def test_encode_event_sends_a_lone_surrogate_as_a_question_mark() -> None:
    assert encode_event("token", "a\ud800b", "s.1") == b"event: token\nid: s.1\ndata: a?b\n\n"


def test_any_text_reads_back_unchanged_but_for_line_breaks_in_both_oracles() -> None:
    cases: list[tuple[bytes, list[tuple[str, str, str]]]] = []

    @settings(max_examples=400, deadline=None)
    @given(data=TEXT, event=SAFE_NAME, event_id=SAFE_NAME)
    def check(data: str, event: str, event_id: str) -> None:
        body = encode_event(event, data, event_id)
        want = [(event, expected_data(data), event_id)]
        assert parse_httpx_sse(body) == want
        cases.append((body, want))

    check()
    assert_node_agrees(cases)


def test_a_stream_of_many_events_reads_back_event_by_event_in_both_oracles() -> None:
    cases: list[tuple[bytes, list[tuple[str, str, str]]]] = []

    @settings(max_examples=150, deadline=None)
    @given(datas=st.lists(TEXT, min_size=1, max_size=8))
    def check(datas: list[str]) -> None:
        body = b"".join(encode_event("token", d, f"s.{n}") for n, d in enumerate(datas, 1))
        want = [("token", expected_data(d), f"s.{n}") for n, d in enumerate(datas, 1)]
        assert parse_httpx_sse(body) == want
        cases.append((body, want))

    check()
    assert_node_agrees(cases)


BREAKERS = ["\r", "\n", "\0", " ", "\t", "é", "\u2028", "\x7f", "\ud800"]  # CR, LF, NUL, space, non-ASCII...


@settings(max_examples=300)
@given(
    good=SAFE_NAME,
    bad=st.one_of(
        st.just(""),
        st.tuples(st.text(max_size=5), st.sampled_from(BREAKERS), st.text(max_size=5)).map("".join),
    ),
)
def test_event_names_and_ids_that_would_break_framing_are_refused(good: str, bad: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        encode_event(bad, "x", good)
    with pytest.raises(ValueError, match="printable ASCII"):
        encode_event(good, "x", bad)


# --- the stream record ------------------------------------------------------------

ENDINGS = st.one_of(
    st.builds(Final, st.sampled_from(["stop", "length", "content_filter", "tool_calls"]),
              st.none() | st.fixed_dictionaries({"prompt_tokens": st.integers(0, 9), "completion_tokens": st.integers(0, 9)})),
    # Error messages come from orjson-parsed bodies or our own text: never a lone surrogate.
    st.builds(UpstreamError, st.sampled_from(["upstream_error", "timeout", "protocol_error"]), TEXT.map(expected_data),
              st.none() | st.integers(400, 599)),
    st.just("cancel"),
)


def split_blocks(body: bytes) -> list[bytes]:
    """The complete events of a body, each with its blank line; asserts nothing is left over."""
    assert body.endswith(b"\n\n")
    blocks = [block + b"\n\n" for block in body[:-2].split(b"\n\n")]
    for block in blocks:
        lines = block[:-2].split(b"\n")
        assert lines[0].startswith(b"event: ") and lines[1].startswith(b"id: ")
        assert lines[2:] and all(line.startswith(b"data: ") for line in lines[2:])
    return blocks


def assert_well_formed(record: StreamRecord, tokens: list[str], reason: str) -> list[tuple[str, str, str]]:
    """The whole stream: complete events, ids <stream>.1..n, token* usage? error? done."""
    body = record.read(0)
    assert body is not None
    blocks = split_blocks(body)
    events = parse_httpx_sse(body)
    assert len(events) == len(blocks) == record.count
    assert [event_id for _, _, event_id in events] == [f"{record.id}.{n}" for n in range(1, len(events) + 1)]
    assert re.fullmatch(r"(token,)*(usage,)?(error,)?done,", "".join(name + "," for name, _, _ in events))
    assert [data for name, data, _ in events if name == "token"] == [expected_data(t) for t in tokens if t]
    assert all(data for name, data, _ in events if name == "token")
    assert events[-1][:2] == ("done", reason) and record.finished
    for position in range(record.count + 1):
        assert record.read(position) == b"".join(blocks[position:])
    return events


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(TEXT.filter(bool), max_size=10), ending=ENDINGS)
def test_stream_record_appends_then_finish_give_a_well_formed_stream(tokens: list[str], ending: Any) -> None:
    async def main() -> None:
        record = StreamRecord("abc-DEF_1", None, REQUEST, 1 << 20)
        for token in tokens:
            record.append("token", token)
        if isinstance(ending, Final):
            record.finish(ending.finish_reason, ending.usage, None)
            reason = ending.finish_reason
        elif isinstance(ending, UpstreamError):
            record.finish("error", None, ending)
            reason = "error"
        else:
            record.finish("cancelled", None, None)
            reason = "cancelled"
        record.finish("stop", {"prompt_tokens": 1}, None)  # a second finish changes nothing
        events = assert_well_formed(record, tokens, reason)
        if isinstance(ending, UpstreamError):
            assert json.loads(events[-2][1]) == orjson.loads(orjson.dumps(ending.as_event_data()))

    anyio.run(main)


def fake_provider(chunks: list[str], ending: Any) -> Callable[..., AsyncGenerator[Chunk, None]]:
    async def provider(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
        for chunk in chunks:
            await anyio.lowlevel.checkpoint()
            yield chunk
        if isinstance(ending, Final):
            yield ending
        elif isinstance(ending, BaseException):
            raise ending
        elif ending == "cancel":
            assert record_of_test[0].cancel("test")
            await anyio.sleep_forever()
        # "nothing": the provider ends without a Final

    record_of_test: list[StreamRecord] = []
    provider.record = record_of_test  # type: ignore[attr-defined]
    return provider


GENERATE_ENDINGS = st.one_of(
    ENDINGS,
    st.just("nothing"),
    st.sampled_from([httpx.ReadTimeout("slow"), httpx.ConnectTimeout("no"), httpx.PoolTimeout("pool"),
                     httpx.RemoteProtocolError("cut"), httpx.ReadError("")]),
)


def expected_reason(ending: Any) -> str:
    if isinstance(ending, Final):
        return ending.finish_reason
    return "cancelled" if ending == "cancel" else "error"


def test_any_chunk_sequence_through_generate_gives_a_well_formed_stream() -> None:
    cases: list[tuple[bytes, list[tuple[str, str, str]]]] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(chunks=st.lists(st.one_of(st.just(""), TEXT), max_size=10), ending=GENERATE_ENDINGS)
    def check(chunks: list[str], ending: Any) -> None:
        anyio.run(generate_and_check, chunks, ending, cases)

    check()
    assert_node_agrees(cases)


async def generate_and_check(chunks: list[str], ending: Any, cases: list[tuple[bytes, list[tuple[str, str, str]]]]) -> None:
    """One generation from a fake provider; the stream is checked, then kept for Node."""
    gateway = Gateway({"USAGE_DB": "", "ECHO_DELAY_SECONDS": "0"})
    provider = fake_provider(chunks, ending)
    record = StreamRecord("s1", None, REQUEST, gateway.start().config.stream_buffer_bytes)
    provider.record.append(record)  # type: ignore[attr-defined]
    gateway.start().admission.admit(None)
    gateway.start().registry.add(record)
    await Generation(gateway.start(), record, provider, gateway.start().config.upstreams["echo"]).run()
    await gateway.aclose()
    events = assert_well_formed(record, chunks, expected_reason(ending))
    names = [name for name, _, _ in events]
    assert ("error" in names) == (expected_reason(ending) == "error")
    assert ("usage" in names) == (any(chunks) or (isinstance(ending, Final) and ending.usage is not None))
    assert gateway.metrics.active == 0 and gateway.metrics.active_by_key == {}
    assert record.tokens == sum(1 for c in chunks if c)
    cases.append((record.read(0) or b"", events))


# --- bounded memory ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(datas=st.lists(st.text(max_size=60), min_size=1, max_size=40), max_bytes=st.integers(1, 400))
def test_a_bounded_record_drops_the_oldest_events_and_says_so(datas: list[str], max_bytes: int) -> None:
    async def main() -> None:
        bounded = StreamRecord("s", None, REQUEST, max_bytes)
        whole = StreamRecord("s", None, REQUEST, 1 << 30)
        for data in datas:
            bounded.append("token", data)
            whole.append("token", data)
        full = whole.read(0)
        assert full is not None
        blocks = split_blocks(full)
        held = [p for p in range(bounded.count + 1) if bounded.read(p) is not None]
        first = held[0]
        assert held == list(range(first, bounded.count + 1))  # what was dropped is a prefix
        for position in held:
            assert bounded.read(position) == b"".join(blocks[position:])
            assert bounded.holds_position(position)
        assert not bounded.holds_position(first - 1) if first else True
        kept = bounded.read(first)
        assert first < bounded.count  # the newest event is always held
        # Held: at most max_bytes, or (after a drop) under half of it beyond the oldest held event.
        assert kept is not None and (len(kept) <= max_bytes or len(kept) - len(blocks[first]) <= max_bytes // 2)
        if len(blocks) > 1 and len(full) > max_bytes and len(full) - len(blocks[0]) >= max_bytes // 2:
            assert bounded.read(0) is None

    anyio.run(main)
