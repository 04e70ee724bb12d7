"""Retries before the first token (docs/design.md, Retries): connection failures,
429 and 5xx answers, and Anthropic's overloaded_error before any text are
tried again, up to 3 attempts, with backoff honouring Retry-After (capped),
never past the first-token deadline and never after a token was sent."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import anyio
import httpx
import pytest

from providers import (
    MAX_RETRY_AFTER,
    ChatRequest,
    Upstream,
    UpstreamError,
    backoff_delay,
    error_from_body,
    parse_retry_after,
    retried,
)
from providers.ollama import stream_ollama
from tests.conftest import free_port, serve, stream
from tests.rig import Rig, load_fixture, rig_fixture  # noqa: F401
from tests.upstream import FakeUpstream, Reply

GATEWAY_ENV = {"FIRST_TOKEN_TIMEOUT_SECONDS": "3"}
NOW = {"retry-after": "0"}  # retry at once: the tests are about whether, not when


def ok(backend: str) -> Reply:
    name = {
        "openai": "openai/normal_with_usage",
        "anthropic": "anthropic/normal",
        "ollama": "ollama/normal",
        "gemini": "gemini/normal",
    }
    expected, body = load_fixture(name[backend])
    return Reply(200, expected["content_type"], [body])


def failure(status: int, headers: dict[str, str] | None = None, message: str = "busy") -> Reply:
    body = json.dumps({"error": {"message": f"{message} {status}", "type": "server_error", "code": None}}).encode()
    return Reply(status, "application/json", [body], NOW if headers is None else headers)


def error_of(result: Any) -> dict[str, Any]:
    assert result.names[-2:] == ["error", "done"]
    return dict(json.loads(result.of("error")[0]))


@pytest.mark.parametrize("backend", ["openai", "anthropic", "ollama", "gemini"])
@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 529])
def test_retryable_status_is_retried_and_the_stream_then_succeeds(rig: Rig, backend: str, status: int) -> None:
    rig.reset(failure(status), failure(status), ok(backend))
    result = rig.chat(backend)
    assert result.of("done") == ["stop"] and "error" not in result.names and result.of("token")
    assert len(rig.seen) == 3
    assert rig.seen[0].body == rig.seen[2].body  # the very same request again


def test_three_attempts_in_all_and_the_last_failures_status_reaches_the_client(rig: Rig) -> None:
    rig.reset(failure(503), failure(502), failure(500), ok("openai"))
    error = error_of(rig.chat("openai"))
    assert len(rig.seen) == 3
    assert error["status"] == 500 and error["message"] == "busy 500"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 409, 422])
def test_other_statuses_are_not_retried(rig: Rig, status: int) -> None:
    rig.reset(failure(status), ok("anthropic"))
    assert error_of(rig.chat("anthropic"))["status"] == status
    assert len(rig.seen) == 1


def test_429_for_exhausted_quota_is_not_retried(rig: Rig) -> None:
    body = (
        b'{"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}}'
    )
    rig.reset(Reply(429, "application/json", [body], NOW), ok("openai"))
    assert error_of(rig.chat("openai"))["code"] == "insufficient_quota"
    assert len(rig.seen) == 1


def test_retry_after_is_honoured(rig: Rig) -> None:
    rig.reset(failure(429, {"retry-after": "0.2"}), ok("gemini"))
    assert rig.chat("gemini").of("done") == ["stop"]
    assert rig.seen[1].started - rig.seen[0].started >= 0.2


def test_retry_after_ms_is_honoured_before_retry_after(rig: Rig) -> None:
    rig.reset(failure(503, {"retry-after-ms": "150", "retry-after": "9"}), ok("ollama"))
    assert rig.chat("ollama").of("done") == ["stop"]
    assert 0.15 <= rig.seen[1].started - rig.seen[0].started < 5


def test_a_retry_that_would_start_after_the_first_token_deadline_is_not_tried(rig: Rig) -> None:
    # FIRST_TOKEN_TIMEOUT_SECONDS is 3: waiting 5 s would only end in a timeout, so the 429 itself is reported
    rig.reset(failure(429, {"retry-after": "5"}), ok("openai"))
    error = error_of(rig.chat("openai"))
    assert error["status"] == 429 and error["retry_after"] == 5 and error["type"] == "upstream_error"
    assert len(rig.seen) == 1


def test_retry_after_is_capped() -> None:
    assert MAX_RETRY_AFTER == 10
    assert backoff_delay(1, 3600) == 10 and backoff_delay(2, 0.05) == 0.05


def test_backoff_without_retry_after_grows_exponentially_with_jitter() -> None:
    first = {backoff_delay(1, None) for _ in range(200)}
    second = {backoff_delay(2, None) for _ in range(200)}
    assert all(0.125 <= d <= 0.25 for d in first) and all(0.25 <= d <= 0.5 for d in second)
    assert len(first) > 100  # jitter: attempts of many clients do not line up
    assert max(backoff_delay(30, None) for _ in range(50)) <= 4.0


def anthropic_events(*events: tuple[str, dict[str, Any]]) -> Reply:
    return Reply(pieces=[b"".join(f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events)])


START = ("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1}}})
OVERLOADED = ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


def test_anthropic_overloaded_error_before_any_text_is_retried(rig: Rig) -> None:
    rig.reset(anthropic_events(START, ("ping", {"type": "ping"}), OVERLOADED), ok("anthropic"))
    result = rig.chat("anthropic")
    assert result.text == "Bonjour à tous !\n你好" and result.of("done") == ["stop"]
    assert len(rig.seen) == 2


def test_anthropic_overloaded_error_every_time_reports_the_last_one(rig: Rig) -> None:
    rig.reset(anthropic_events(START, OVERLOADED))
    error = error_of(rig.chat("anthropic"))
    assert error["upstream_type"] == "overloaded_error" and error["message"] == "Overloaded"
    assert len(rig.seen) == 3


def test_anthropic_other_error_events_before_text_are_not_retried(rig: Rig) -> None:
    rig.reset(
        anthropic_events(START, ("error", {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}})),
        ok("anthropic"),
    )
    assert error_of(rig.chat("anthropic"))["upstream_type"] == "invalid_request_error"
    assert len(rig.seen) == 1


def test_no_retry_after_a_token_was_sent(rig: Rig) -> None:
    text = ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}})
    rig.reset(anthropic_events(START, text, OVERLOADED), ok("anthropic"))
    result = rig.chat("anthropic")
    assert result.of("token") == ["Hi"] and error_of(result)["upstream_type"] == "overloaded_error"
    assert len(rig.seen) == 1


def test_connection_refused_everywhere_is_reported_after_three_attempts() -> None:
    with serve({"OLLAMA_BASE_URL": f"http://127.0.0.1:{free_port()}"}) as gw:
        result = stream("GET", gw.url + "/chat/stream?prompt=hi&backend=ollama")
    assert error_of(result)["type"] == "upstream_unavailable"


class Redirecting(httpx.AsyncBaseTransport):
    """A real transport whose n-th attempt goes to the n-th port (refused ones included)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports, self.attempts, self.inner = ports, 0, httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        request.url = request.url.copy_with(port=self.ports[min(self.attempts, len(self.ports)) - 1])
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


REQUEST = ChatRequest([{"role": "user", "content": "hi"}], "ollama", "llama3.2", 16)


async def collect(transport: Redirecting) -> list[Any]:
    async with httpx.AsyncClient(transport=transport) as http:
        return [chunk async for chunk in retried(stream_ollama)(http, Upstream("http://127.0.0.1:1"), REQUEST)]


@pytest.mark.anyio
async def test_connection_refused_is_retried_and_then_connects(anyio_backend: str) -> None:
    with FakeUpstream(lambda seen: ok("ollama")) as upstream:
        refused = free_port()
        transport = Redirecting([refused, refused, upstream.port])
        chunks = await collect(transport)
    assert transport.attempts == 3 and "".join(c for c in chunks if isinstance(c, str)) == "Bonjour le monde\n你好"


@pytest.mark.anyio
async def test_connection_refused_three_times_raises_upstream_unavailable(anyio_backend: str) -> None:
    transport = Redirecting([free_port()])
    with pytest.raises(UpstreamError) as caught:
        await collect(transport)
    assert transport.attempts == 3 and caught.value.type == "upstream_unavailable"


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),  # an unreadable retry-after-ms falls back
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date in the past: at once
        ({"retry-after": "tomorrow"}, None),
        ({}, None),
    ],
)
def test_retry_after_headers_are_read_as_seconds(headers: dict[str, str], seconds: float | None) -> None:
    assert parse_retry_after(headers) == seconds


def test_retry_after_as_a_future_http_date_is_the_time_until_then() -> None:
    import time
    from email.utils import formatdate

    wait = parse_retry_after({"retry-after": formatdate(time.time() + 60, usegmt=True)})
    assert wait is not None and 55 < wait <= 60


@pytest.mark.parametrize(
    ("body", "message", "upstream_type"),
    [
        (
            b'[{"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}}]',
            "Resource exhausted",
            "RESOURCE_EXHAUSTED",
        ),
        (b"<html>Bad gateway</html>", "upstream answered HTTP 502: <html>Bad gateway</html>", None),
        (b"", "upstream answered HTTP 502", None),
        (b'{"error": {"type": 7}}', 'upstream answered HTTP 502: {"error": {"type": 7}}', None),
    ],
)
def test_error_bodies_of_any_shape_give_a_message(body: bytes, message: str, upstream_type: str | None) -> None:
    error = error_from_body(502, body, None)
    assert (error.message, error.upstream_type, error.status) == (message, upstream_type, 502)


def test_a_huge_error_body_is_read_only_up_to_the_limit(rig: Rig) -> None:
    rig.reset(Reply(400, "text/html", [b"x" * 50_000] * 4))
    error = error_of(rig.chat("gemini"))
    assert error["status"] == 400 and error["message"] == "upstream answered HTTP 400: " + "x" * 200


def test_connect_timeout_is_retried_and_reported_as_a_timeout() -> None:
    # A listener that never accepts: once its backlog is full, the kernel drops new SYNs and connects hang.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued = []
        while True:
            client = socket.socket()
            client.settimeout(0.2)
            try:
                client.connect(("127.0.0.1", port))
            except TimeoutError:
                client.close()
                break
            queued.append(client)
        try:
            env = {"OLLAMA_BASE_URL": f"http://127.0.0.1:{port}", "CONNECT_TIMEOUT_SECONDS": "0.2"}
            with serve(env) as gw:
                started = time.monotonic()
                result = stream("GET", gw.url + "/chat/stream?prompt=hi&backend=ollama")
                elapsed = time.monotonic() - started
        finally:
            for client in queued:
                client.close()
    error = error_of(result)
    assert error["type"] == "timeout" and "connect" in error["message"]
    assert elapsed >= 3 * 0.2  # three attempts, each given its whole connect timeout


@pytest.mark.anyio
async def test_a_client_that_leaves_as_a_retryable_failure_arrives_is_a_cancel_not_that_failure(anyio_backend: str) -> None:
    # The race CI once hit: the 429 arrives and the client leaves in the same loop turn, so the
    # cancel is called but not yet delivered when retried() weighs the retry. A cancelled scope's
    # effective deadline is -inf: read as "too late to retry", the 429 became the stream's outcome.
    attempts = 0

    async def rate_limited(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> Any:
        nonlocal attempts
        attempts += 1
        generation.cancel()  # the client leaves: called, not yet delivered
        raise UpstreamError("upstream_error", "busy 429", status=429, retry_after=10, retryable=True)
        yield  # pragma: no cover - an async generator that fails at its first step

    with anyio.CancelScope() as generation:
        async with httpx.AsyncClient() as http:
            async for _ in retried(rate_limited)(http, Upstream("http://127.0.0.1:1"), REQUEST):
                pass  # pragma: no cover
    assert generation.cancelled_caught and attempts == 1
