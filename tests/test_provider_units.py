"""What providers share (providers/__init__.py) and the openai chunk reader,
as pure functions; upstream HTTP is httpx.MockTransport where a request is
needed (the socket-level behaviour is in the end-to-end suites). Retries are
not tested here: the providers branch moves them out of open_stream and
tests them there (tests/test_retries.py)."""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import nullcontext
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

import providers
from providers import (
    ChatRequest,
    Final,
    Upstream,
    UpstreamError,
    backoff_delay,
    error_from_body,
    make_usage,
    open_stream,
    parse_retry_after,
    read_at_most,
)
from providers.openai import ChunkReader, build_request, in_band_error, stream_openai

pytestmark = pytest.mark.anyio

REQUEST = ChatRequest([{"role": "user", "content": "hi"}], "openai", "gpt-x", 5, 0.5)


# --- shared pieces -----------------------------------------------------------------------


def test_make_usage_fills_missing_counts_and_keeps_extras() -> None:
    assert make_usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    usage = make_usage(None, "x", 9, cached=2, other=None)
    assert usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 9, "cached": 2}


def test_an_upstream_error_reads_as_its_type_and_message_and_sends_what_is_known() -> None:
    error = UpstreamError("upstream_error", "slow down", 429, 1.5, "rate_limit_error", "rate_limited")
    assert str(error) == "upstream_error: slow down"
    assert error.as_event_data() == {"type": "upstream_error", "message": "slow down", "status": 429, "retry_after": 1.5,
                                     "upstream_type": "rate_limit_error", "code": "rate_limited"}  # fmt: skip
    assert UpstreamError("timeout", "t").as_event_data() == {"type": "timeout", "message": "t"}


@pytest.mark.parametrize(("headers", "seconds"), [
    ({}, None), ({"retry-after": ""}, None), ({"retry-after": "7"}, 7.0), ({"retry-after": "-3"}, 0.0),
    ({"retry-after-ms": "1500"}, 1.5), ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),
    ({"retry-after": "soon"}, None), ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
])  # fmt: skip
def test_parse_retry_after_reads_seconds_milliseconds_and_dates(headers: dict[str, str], seconds: float | None) -> None:
    assert parse_retry_after(headers) == seconds


def test_parse_retry_after_reads_a_future_http_date_as_seconds_from_now() -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (parse_retry_after({"retry-after": later}) or 0) <= 30


@given(st.integers(1, 10), st.none() | st.floats(0, 1000))
def test_backoff_is_bounded_and_honours_retry_after_up_to_a_cap(attempt: int, retry_after: float | None) -> None:
    delay = backoff_delay(attempt, retry_after)
    if retry_after is None:
        assert 0.125 * min(2 ** (attempt - 1), 16) <= delay <= min(0.25 * 2 ** (attempt - 1), 4.0)
    else:
        assert delay == min(retry_after, providers.MAX_RETRY_AFTER)


@pytest.mark.parametrize(("body", "message", "upstream_type", "code"), [
    (b'{"error": {"message": "bad key", "type": "invalid_request_error", "code": "invalid_api_key"}}', "bad key",
     "invalid_request_error", "invalid_api_key"),
    (b'{"error": "model not found"}', "model not found", None, None),  # ollama
    (b'[{"error": {"code": 400, "message": "bad model", "status": "INVALID_ARGUMENT"}}]', "bad model", "INVALID_ARGUMENT", 400),
    (b'{"error": {"type": 5, "message": ""}}', 'upstream answered HTTP 418: {"error": {"type": 5, "message": ""}}', None, None),
    (b"<html>Bad gateway</html>", "upstream answered HTTP 418: <html>Bad gateway</html>", None, None),
    (b"", "upstream answered HTTP 418", None, None),
    (b'{"detail": "nope"}', 'upstream answered HTTP 418: {"detail": "nope"}', None, None),
])  # fmt: skip
def test_error_from_body_finds_the_providers_own_message(body: bytes, message: str, upstream_type: str | None, code: Any) -> None:
    error = error_from_body(418, body, 2.0)
    assert (error.type, error.status, error.retry_after) == ("upstream_error", 418, 2.0)
    assert (error.message, error.upstream_type, error.code) == (message, upstream_type, code)


def test_error_from_body_shows_at_most_200_bytes_of_an_unknown_body() -> None:
    assert error_from_body(500, b"x" * 1000, None).message == "upstream answered HTTP 500: " + "x" * 200


# --- opening an upstream request --------------------------------------------------------------


def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """Retries without waiting; records the retry_after each backoff was given."""
    seen: list[float | None] = []

    def delay(attempt: int, retry_after: float | None) -> float:
        seen.append(retry_after)
        return 0.0

    monkeypatch.setattr(providers, "backoff_delay", delay)
    return seen


def replies(*responses: httpx.Response | Exception) -> tuple[Callable[[httpx.Request], httpx.Response], list[httpx.Request]]:
    """A handler answering with `responses` in turn, and the requests it saw."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        reply = responses[len(seen) - 1]
        if isinstance(reply, Exception):
            raise reply
        return reply

    return handler, seen


async def test_open_stream_posts_the_body_and_yields_a_2xx_response() -> None:
    handler, seen = replies(httpx.Response(200, content=b"data: x\n\n"))
    async with mock_client(handler) as http, open_stream(http, "http://u/x", {"a": 1}, {"h": "v"}) as response:
        assert response.status_code == 200 and await response.aread() == b"data: x\n\n"
    assert orjson.loads(seen[0].content) == {"a": 1} and seen[0].headers["h"] == "v"


def opening(url: str) -> providers.Provider:
    """A provider that only opens the upstream request, then yields its body."""

    async def provider(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[providers.Chunk, None]:
        async with open_stream(http, url, {}, {}) as response:
            yield (await response.aread()).decode()
            yield Final("stop")

    return provider


@pytest.mark.parametrize(("status", "body", "retryable"), [
    (400, b'{"error": {"message": "bad"}}', False), (401, b"no", False),
    (429, b'{"error": {"message": "quota", "code": "insufficient_quota"}}', False),
    (429, b'{"error": {"message": "slow down"}}', True), (503, b"busy", True),
])  # fmt: skip
async def test_client_errors_and_exhausted_quota_are_not_retried_and_the_rest_are(
    no_backoff: list[float | None], status: int, body: bytes, retryable: bool
) -> None:
    """open_stream marks each failure retryable or not; retried() acts on the mark."""
    handler, seen = replies(httpx.Response(status, content=body), httpx.Response(200, content=b"second"))
    async with mock_client(handler) as http:
        with pytest.raises(UpstreamError) as caught:
            async with open_stream(http, "http://u/x", {}, {}):
                pass
        assert caught.value.status == status and caught.value.retryable is retryable
        seen.clear()
        chunks: list[providers.Chunk] = []
        with pytest.raises(UpstreamError) if not retryable else nullcontext():
            async for chunk in providers.retried(opening("http://u/x"))(http, Upstream("http://u"), REQUEST):
                chunks.append(chunk)
    assert len(seen) == (2 if retryable else 1)
    assert no_backoff == [None]  # retried() asked for its delay once, and did not wait it here
    assert chunks == (["second", Final("stop")] if retryable else [])


@pytest.mark.parametrize(("failure", "error_type", "message"), [
    (httpx.ConnectError("refused"), "upstream_unavailable", "cannot connect to the upstream: ConnectError"),
    (httpx.ConnectTimeout("slow"), "timeout", "connect timeout: no connection to the upstream"),
])  # fmt: skip
async def test_open_stream_reports_connection_failures_as_typed_errors(failure: Exception, error_type: str, message: str) -> None:
    handler, _ = replies(failure, failure, failure)
    async with mock_client(handler) as http:
        with pytest.raises(UpstreamError) as caught:
            async with open_stream(http, "http://u/x", {}, {}):
                pass
    assert (caught.value.type, caught.value.message) == (error_type, message)


async def test_read_at_most_stops_at_the_limit() -> None:
    async with mock_client(lambda request: httpx.Response(500, content=b"x" * 100)) as http:
        response = await http.send(http.build_request("GET", "http://u/"), stream=True)
        assert await read_at_most(response, 10) == b"x" * 10
        await response.aclose()


# --- the openai chunk reader ----------------------------------------------------------------------


def test_build_request_asks_for_a_stream_with_usage_and_sends_the_key() -> None:
    url, body, headers = build_request(Upstream("https://api.openai.com/v1/", "sk-1"), REQUEST)
    assert url == "https://api.openai.com/v1/chat/completions"
    assert body == {"model": "gpt-x", "messages": REQUEST.messages, "stream": True, "stream_options": {"include_usage": True},
                    "max_completion_tokens": 5, "temperature": 0.5}  # fmt: skip
    assert headers["authorization"] == "Bearer sk-1"


def test_build_request_for_a_compatible_server_uses_max_tokens_and_no_key_when_none() -> None:
    request = ChatRequest(REQUEST.messages, "openai", "m", 7)
    _, body, headers = build_request(Upstream("http://127.0.0.1:8080/v1"), request)
    assert body["max_tokens"] == 7 and "max_completion_tokens" not in body and "temperature" not in body
    assert "authorization" not in headers


def chunk(content: Any = None, finish: Any = None, **extra: Any) -> bytes:
    delta = {} if content is None else {"content": content}
    return orjson.dumps({"choices": [{"delta": delta, "finish_reason": finish}], **extra})


def test_the_reader_takes_text_notes_finish_and_last_usage_and_ignores_after_done() -> None:
    reader = ChunkReader()
    assert reader.token(chunk(None)) is None  # role-only first chunk
    assert reader.token(chunk("")) is None
    assert reader.token(chunk("Hi")) == "Hi"
    assert reader.token(b"  ") is None  # an empty keep-alive frame
    assert reader.token(chunk(None, "stop")) is None
    assert reader.token(orjson.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})) is None
    assert reader.token(b"[DONE]") is None and reader.done
    assert reader.token(chunk("late")) is None
    assert reader.final(None) == Final("stop", {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})


def test_the_reader_takes_groq_usage() -> None:
    reader = ChunkReader()
    reader.token(chunk(None, "length", x_groq={"usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}}))
    assert reader.final(None) == Final("length", {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9})


@pytest.mark.parametrize(("data", "message"), [
    (b"{nope", "the upstream sent a data line that is not JSON"),
    (b"[1, 2]", "the upstream sent a JSON value that is not a chunk object"),
    (b'{"choices": ["x"]}', "the upstream sent a choice that is not an object"),
])  # fmt: skip
def test_the_reader_refuses_malformed_chunks_as_protocol_errors(data: bytes, message: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        ChunkReader().token(data)
    assert (caught.value.type, caught.value.message) == ("protocol_error", message)


def test_a_choice_without_a_delta_object_carries_no_text() -> None:
    assert ChunkReader().token(b'{"choices": [{"delta": "x", "finish_reason": null}]}') is None
    assert ChunkReader().token(b'{"choices": "x"}') is None


@pytest.mark.parametrize(("data", "expected"), [
    (b'{"error": {"message": "overloaded", "type": "server_error", "code": 503}}', ("overloaded", "server_error", 503)),
    (b'{"object": "error", "message": "old vllm", "type": "BadRequestError", "code": 400}', ("old vllm", "BadRequestError", 400)),
    (b'{"error": "a string"}', ("a string", None, None)),
    (b'{"error": {"type": 7}}', ("the upstream reported an error", None, None)),
])  # fmt: skip
def test_in_band_errors_are_upstream_errors(data: bytes, expected: tuple[Any, ...]) -> None:
    with pytest.raises(UpstreamError) as caught:
        ChunkReader().token(data)
    error = caught.value
    assert (error.type, error.message, error.upstream_type, error.code) == ("upstream_error", *expected)


def test_in_band_error_of_a_non_error_object() -> None:
    assert in_band_error({"error": None}).message == "the upstream reported an error"


def test_the_end_without_a_finish_reason_is_a_protocol_error_or_the_error_field() -> None:
    with pytest.raises(UpstreamError, match="without a finish reason"):
        ChunkReader().final(None)
    with pytest.raises(UpstreamError) as caught:
        ChunkReader().final(b'{"message": "slot unavailable", "type": "unavailable_error"}')
    assert (caught.value.message, caught.value.upstream_type) == ("slot unavailable", "unavailable_error")
    with pytest.raises(UpstreamError) as caught:
        ChunkReader().final(b"plain text failure")
    assert caught.value.message == "plain text failure"


@pytest.mark.parametrize(("raw", "reason"), [("function_call", "tool_calls"), ("eos", "stop"),
                                            ("content_filter", "content_filter"), ("tool_calls", "tool_calls")])
def test_finish_reasons_are_normalized(raw: str, reason: str) -> None:
    reader = ChunkReader()
    reader.token(chunk(None, raw))
    assert reader.final(None) == Final(reason, None)


def test_an_unknown_finish_reason_is_a_stop_with_the_raw_value_in_usage() -> None:
    reader = ChunkReader()
    reader.token(chunk(None, "weird"))
    assert reader.final(None) == Final("stop", {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                                                "upstream_finish_reason": "weird"})  # fmt: skip


@pytest.mark.parametrize("raw", ["abort", "error"])
def test_an_error_finish_reason_is_an_upstream_error(raw: str) -> None:
    reader = ChunkReader()
    reader.token(chunk("partial", raw))
    with pytest.raises(UpstreamError, match=f"the upstream stopped with '{raw}'"):
        reader.final(None)


async def test_stream_openai_dispatches_an_unterminated_last_event() -> None:
    body = b"data: " + chunk("a") + b"\n\ndata: " + chunk("b", "stop")  # no blank line, no [DONE]
    async with mock_client(lambda request: httpx.Response(200, content=body)) as http:
        chunks = [c async for c in stream_openai(http, Upstream("http://u/v1", "k"), REQUEST)]
    assert chunks == ["a", "b", Final("stop", None)]


async def test_stream_openai_takes_an_unterminated_done_as_the_end() -> None:
    body = b"data: " + chunk("a", "stop") + b"\n\ndata: [DONE]"  # llama-server ends like this
    async with mock_client(lambda request: httpx.Response(200, content=body)) as http:
        chunks = [c async for c in stream_openai(http, Upstream("http://u/v1", "k"), REQUEST)]
    assert chunks == ["a", Final("stop", None)]
