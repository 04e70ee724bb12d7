"""Upstream JSON of shapes no server sends, at every field each provider
reads: the parser takes it or refuses it as an UpstreamError, nothing else
(providers/: openai, gemini, anthropic, ollama). A value nested a thousand
deep is among them: orjson reads 1,024 levels and writes 254, and `str()` of
one overflows the stack (RecursionError) at Python's default limit, which the
gateway runs at and Hypothesis raises while it runs (so it is set back here).

The generation turns any other exception into the stream's `protocol_error`
(tests/test_inprocess.py); these tests keep the providers from needing that:
each finding here was one (a hypothesis run over the same shapes, then the
cases below, each failing before its fix)."""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers import ChatRequest, Chunk, Upstream, UpstreamError, anthropic, error_from_body, gemini, json_object, ollama, openai

GATEWAY_RECURSION_LIMIT = 1000  # CPython's default, which the gateway does not change


@contextmanager
def gateway_stack() -> Iterator[None]:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(GATEWAY_RECURSION_LIMIT)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def deep(depth: int, leaf: bytes = b"0") -> bytes:
    """A JSON list nested `depth` deep, as bytes (orjson would not write it)."""
    return b"[" * depth + leaf + b"]" * depth


def deep_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"{}" + b"}" * depth


DEEP = deep(1000)


def drain(provider: Callable[..., AsyncGenerator[Chunk, None]], body: bytes, request: ChatRequest, content_type: str) -> list[Chunk]:
    """Every chunk of `provider` over a 200 response carrying `body`."""

    async def run() -> list[Chunk]:
        transport = httpx.MockTransport(lambda _: httpx.Response(200, headers={"content-type": content_type}, content=body))
        async with httpx.AsyncClient(transport=transport) as http:
            return [chunk async for chunk in provider(http, Upstream("http://up.test", "k"), request)]

    with gateway_stack():
        return anyio.run(run)


def openai_read(*payloads: bytes, error_field: bytes | None = None) -> Any:
    reader = openai.ChunkReader()
    with gateway_stack():
        for payload in payloads:
            reader.token(payload)
        return reader.final(error_field)


def gemini_read(*payloads: bytes) -> Any:
    reader = gemini.ChunkReader(False)
    with gateway_stack():
        for payload in payloads:
            reader.tokens(json_object(payload, "an event"))
        return reader.final()


ANTHROPIC = ChatRequest([{"role": "user", "content": "hi"}], "anthropic", "claude-x", 5)
OLLAMA = ChatRequest([{"role": "user", "content": "hi"}], "ollama", "llama3.2", 5)


def anthropic_events(*events: tuple[str, bytes]) -> list[Chunk]:
    body = b"".join(b"event: %b\ndata: %b\n\n" % (name.encode(), data) for name, data in events)
    return drain(anthropic.stream_anthropic, body, ANTHROPIC, "text/event-stream")


def ollama_lines(*lines: bytes) -> list[Chunk]:
    return drain(ollama.stream_ollama, b"".join(line + b"\n" for line in lines), OLLAMA, "application/x-ndjson")


# --- each finding --------------------------------------------------------------------------------


def test_openai_reasoning_details_of_another_type_then_text_merge_without_failing() -> None:
    # a fragment's `text` of 1, then a string for the same entry: the string is kept, nothing raised
    final = openai_read(b'{"choices":[{"delta":{"reasoning_details":[{"text":1},{"index":0,"text":"a"}]},"finish_reason":"stop"}]}')
    assert final.round_trip.reasoning_details == [{"text": "a", "index": 0}]
    final = openai_read(b'{"choices":[{"delta":{"reasoning_details":[{"data":[]}]}}]}',
                        b'{"choices":[{"delta":{"reasoning_details":[{"index":0,"data":"x"}]},"finish_reason":"stop"}]}')  # fmt: skip
    assert final.round_trip.reasoning_details == [{"data": "x", "index": 0}]


@pytest.mark.parametrize("read", [
    lambda: openai_read(b'{"error":' + DEEP + b"}"),
    lambda: openai_read(b'{"error":{"message":' + DEEP + b"}}"),
    lambda: openai_read(error_field=DEEP),
    lambda: gemini_read(b'{"error":{"message":' + DEEP + b"}}"),
    lambda: anthropic_events(("error", b'{"error":{"message":' + DEEP + b"}}")),
    lambda: ollama_lines(b'{"error":' + DEEP + b"}"),
], ids=["openai error", "openai message", "llama.cpp error field", "gemini", "anthropic", "ollama"])  # fmt: skip
def test_an_error_message_nested_a_thousand_deep_is_an_upstream_error(read: Callable[[], Any]) -> None:
    with pytest.raises(UpstreamError) as caught:
        read()
    assert caught.value.type == "upstream_error"
    assert isinstance(caught.value.message, str) and len(orjson.dumps(caught.value.as_event_data())) < 10_000


def test_an_error_code_nested_deeper_than_json_is_written_is_left_out() -> None:
    # the error event is written with orjson (254 levels): a deeper code would fail it at the stream's end
    with pytest.raises(UpstreamError) as caught:
        openai_read(b'{"error":{"message":"m","code":' + deep(300) + b"}}")
    assert caught.value.as_event_data() == {"type": "upstream_error", "message": "m"}
    assert error_from_body(400, b'{"error":{"message":"m","code":' + deep(300) + b"}}", None).code is None
    assert error_from_body(400, b'{"error":{"message":"m","code":{"detail":1}}}', None).code == {"detail": 1}


def test_error_from_body_shows_a_message_nested_a_thousand_deep_as_its_type() -> None:
    with gateway_stack():
        error = error_from_body(500, b'{"error":{"message":' + DEEP + b"}}", None)
    assert error.message == "list"


def test_an_openai_finish_reason_nested_a_thousand_deep_is_an_unknown_reason() -> None:
    # an unknown reason is a stop with the raw value in usage (docs/design.md): here, what it can show of it
    final = openai_read(b'{"choices":[{"delta":{},"finish_reason":' + DEEP + b"}]}")
    assert (final.finish_reason, final.usage["upstream_finish_reason"]) == ("stop", "list")


@pytest.mark.parametrize("read", [
    lambda: gemini_read(b'{"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":' + deep_object(255) + b"}}]}}]}"),
    lambda: ollama_lines(b'{"message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":'
                         + deep(255) + b"}}]},\"done\":false}"),
], ids=["gemini", "ollama"])  # fmt: skip
def test_tool_call_arguments_nested_deeper_than_json_is_written_are_a_protocol_error(read: Callable[[], Any]) -> None:
    with pytest.raises(UpstreamError) as caught:
        read()
    assert (caught.value.type, caught.value.message) == ("protocol_error", "the upstream sent tool call arguments nested too deep")


# --- any value at any field --------------------------------------------------------------------

SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False),
                   st.text(max_size=6), st.sampled_from(["", "stop", "error", "tool_use", "[DONE]"]))  # fmt: skip
JUNK = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=8)  # fmt: skip


class Raw(bytes):
    """JSON text put in place as is (a value nested past what orjson writes)."""


WRONG = st.one_of(JUNK, JUNK, JUNK, st.sampled_from([Raw(deep(300)), Raw(deep(1000)), Raw(deep_object(300))]))
TEXT = st.text(max_size=5)
INDEX = st.integers(-2, 5)


def encoded(value: Any) -> bytes:
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, dict):
        return b"{" + b",".join(orjson.dumps(str(k)) + b":" + encoded(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(map(encoded, value)) + b"]"
    return orjson.dumps(value)


def field(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: mostly of the right shape, else any JSON value."""
    return st.one_of(right, right, WRONG)


def shape(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """An object with any of `fields`, each right or wrong; sometimes not an object at all."""
    whole = st.fixed_dictionaries({}, optional={name: field(value) for name, value in fields.items()})
    return st.one_of(whole, whole, whole, WRONG)


def some(item: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(item, max_size=3)


OPENAI_USAGE = shape(prompt_tokens=INDEX, completion_tokens=INDEX, total_tokens=INDEX,
                     completion_tokens_details=shape(reasoning_tokens=INDEX))
OPENAI_CHUNK = shape(
    object=st.sampled_from(["chat.completion.chunk", "error"]),
    usage=OPENAI_USAGE,
    x_groq=shape(usage=OPENAI_USAGE),
    error=shape(message=TEXT, type=TEXT, code=TEXT),
    choices=some(shape(
        finish_reason=st.sampled_from([*openai.FINISH_REASONS, "new"]),
        delta=shape(
            content=TEXT, reasoning_content=TEXT, reasoning=TEXT,
            reasoning_details=some(shape(type=st.sampled_from(sorted(openai.OPENROUTER_DETAILS)), index=INDEX, text=TEXT,
                                         summary=TEXT, data=TEXT, signature=TEXT)),
            tool_calls=some(shape(index=INDEX, id=TEXT, function=shape(name=TEXT, arguments=TEXT),
                                  extra_content=shape(google=shape(thought_signature=TEXT)))),
        ),
    )),
)  # fmt: skip
GEMINI_CHUNK = shape(
    candidates=some(shape(
        finishReason=st.sampled_from([*gemini.FINISH_REASONS, "NEW"]),
        content=shape(role=TEXT, parts=some(shape(text=TEXT, thought=st.booleans(), thoughtSignature=TEXT,
                                                  functionCall=shape(name=TEXT, args=shape(a=TEXT))))),
    )),
    usageMetadata=shape(promptTokenCount=INDEX, candidatesTokenCount=INDEX, thoughtsTokenCount=INDEX, totalTokenCount=INDEX),
    promptFeedback=shape(blockReason=TEXT),
    error=shape(message=TEXT, status=TEXT, code=INDEX),
)  # fmt: skip
ANTHROPIC_USAGE = shape(input_tokens=INDEX, output_tokens=INDEX, cache_creation_input_tokens=INDEX, cache_read_input_tokens=INDEX)
ANTHROPIC_DELTA = shape(type=st.sampled_from(["text_delta", "thinking_delta", "signature_delta", "input_json_delta"]), text=TEXT,
                        thinking=TEXT, signature=TEXT, partial_json=TEXT,
                        stop_reason=st.sampled_from([*anthropic.FINISH_REASONS, "new"]))  # fmt: skip
ANTHROPIC_EVENT = st.one_of(
    st.tuples(st.just("message_start"), shape(message=shape(id=TEXT, usage=ANTHROPIC_USAGE))),
    st.tuples(st.just("content_block_start"), shape(index=INDEX, content_block=shape(
        type=st.sampled_from(["text", "thinking", "redacted_thinking", "tool_use"]), text=TEXT, thinking=TEXT, signature=TEXT,
        data=TEXT, id=TEXT, name=TEXT, input=shape(a=TEXT)))),
    st.tuples(st.just("content_block_delta"), shape(index=INDEX, delta=ANTHROPIC_DELTA)),
    st.tuples(st.just("content_block_stop"), shape(index=INDEX)),
    st.tuples(st.just("message_delta"), shape(delta=ANTHROPIC_DELTA, usage=ANTHROPIC_USAGE)),
    st.tuples(st.just("error"), shape(error=shape(message=TEXT, type=TEXT))),
)  # fmt: skip
OLLAMA_LINE = shape(
    message=shape(role=TEXT, content=TEXT, thinking=TEXT,
                  tool_calls=some(shape(id=TEXT, function=shape(name=TEXT, arguments=shape(a=TEXT))))),
    done=st.booleans(), done_reason=st.sampled_from(["stop", "length", "", "load"]), prompt_eval_count=INDEX, eval_count=INDEX,
    error=TEXT,
)  # fmt: skip

ANY_SHAPE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def takes_or_refuses(read: Callable[[], Any]) -> None:
    try:
        read()
    except UpstreamError:
        pass


@ANY_SHAPE
@given(chunks=st.lists(OPENAI_CHUNK, max_size=5), error_field=st.one_of(st.none(), st.binary(max_size=6)))
def test_openai_reads_any_json_at_any_field_or_refuses_it(chunks: list[Any], error_field: bytes | None) -> None:
    takes_or_refuses(lambda: openai_read(*map(encoded, chunks), error_field=error_field))


@ANY_SHAPE
@given(chunks=st.lists(GEMINI_CHUNK, max_size=5))
def test_gemini_reads_any_json_at_any_field_or_refuses_it(chunks: list[Any]) -> None:
    takes_or_refuses(lambda: gemini_read(*map(encoded, chunks)))


@ANY_SHAPE
@given(events=st.lists(ANTHROPIC_EVENT, max_size=6), ends=st.booleans())
def test_anthropic_reads_any_json_at_any_field_or_refuses_it(events: list[tuple[str, Any]], ends: bool) -> None:
    wire = [(name, encoded(data)) for name, data in events]
    if ends:  # so that the end of the stream is read too
        wire += [("message_delta", b'{"delta":{"stop_reason":"end_turn"}}'), ("message_stop", b"{}")]
    takes_or_refuses(lambda: anthropic_events(*wire))


@ANY_SHAPE
@given(lines=st.lists(OLLAMA_LINE, max_size=5), ends=st.booleans())
def test_ollama_reads_any_json_at_any_field_or_refuses_it(lines: list[Any], ends: bool) -> None:
    wire = [encoded(line) for line in lines] + ([b'{"done":true,"done_reason":"stop"}'] if ends else [])
    takes_or_refuses(lambda: ollama_lines(*wire))
