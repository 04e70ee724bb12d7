"""The gateway driven in-process, on asyncio and on trio, by a small ASGI
driver written here: it hands the app scope/receive/send, exposes every
message the app sends as it is sent, and can inject `http.disconnect`.
(httpx's ASGITransport cannot: it waits for the whole response.)"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlencode

import anyio
import httpx
import orjson
import pytest
from httpx_sse import EventSource
from prometheus_client.parser import text_string_to_metric_families

import asgi_stream_core.stores.memory
from asgi_stream import Gateway
from asgi_stream_core import config
from asgi_stream_core.generation import Generation
from asgi_stream_core.record import StreamRecord
from asgi_stream_core.sse import FIRST_CHUNK, HEARTBEAT
from asgi_stream_core.stores.memory import StreamRegistry
from providers import ChatRequest, Final, RoundTrip, UpstreamError
from providers.echo import echo_tokens
from providers.lines import LineTooLong

pytestmark = pytest.mark.anyio

ENV = {"USAGE_DB": "", "RESUME_GRACE_SECONDS": "0", "ECHO_DELAY_SECONDS": "0"}
TIMEOUT = 10  # a failing test fails after this; a passing one never waits for it


@dataclass
class Exchange:
    """One request to the app: what it received, what it sent."""

    scope: dict[str, Any]
    pieces: list[bytes]  # the request body, as http.request messages
    taken: int = 0  # body messages the app has received
    disconnected: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    sent: list[dict[str, Any]] = field(default_factory=list)
    fail_sends_after: int | None = None  # then send raises OSError, as ASGI 2.4 servers do for a gone client
    hold_sends_after: int | None = None  # then send blocks until `released` is set: a client that takes no bytes
    hold_final: bool = False  # block the last body message (more_body False) the same way
    released: anyio.Event = field(default_factory=anyio.Event)

    def __post_init__(self) -> None:
        self._outbox, self._inbox = anyio.create_memory_object_stream[dict[str, Any]](math.inf)

    async def receive(self) -> dict[str, Any]:
        if self.taken < len(self.pieces):
            self.taken += 1
            return {"type": "http.request", "body": self.pieces[self.taken - 1], "more_body": self.taken < len(self.pieces)}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        assert not self.done.is_set()
        if self.fail_sends_after is not None and len(self.sent) >= self.fail_sends_after:
            raise OSError("the client is gone")
        final = message["type"] == "http.response.body" and not message.get("more_body", False)
        if (self.hold_sends_after is not None and len(self.sent) >= self.hold_sends_after) or (self.hold_final and final):
            await self.released.wait()
        self.sent.append(message)
        await self._outbox.send(message)

    async def next(self) -> dict[str, Any]:
        """The next message the app sends."""
        with anyio.fail_after(TIMEOUT):
            return await self._inbox.receive()

    async def next_body(self) -> bytes:
        message = await self.next()
        assert message["type"] == "http.response.body"
        return bytes(message["body"])

    def disconnect(self) -> None:
        self.disconnected.set()

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.sent[0]["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    def close(self) -> None:
        self._outbox.close()
        self._inbox.close()


def make_scope(method: str, path: str, query: str = "", headers: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
        "root_path": "", "headers": [(k.lower().encode("latin-1"), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip


@asynccontextmanager
async def exchange(app: Gateway, method: str, path: str, query: str = "", headers: Sequence[tuple[str, str]] = (),
                   pieces: Sequence[bytes] = (b"",), kind: type[Exchange] | None = None, **behaviour: Any
                   ) -> AsyncIterator[Exchange]:  # fmt: skip
    """Run the app on one request while the caller watches; on exit the
    client disconnects (if the app is still running) and the app must end.
    `kind`: an Exchange subclass that watches more."""
    ex = (kind or Exchange)(make_scope(method, path, query, headers), list(pieces), **behaviour)

    async def run() -> None:
        await app(ex.scope, ex.receive, ex.send)
        ex.done.set()

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run)
            yield ex
            ex.disconnect()
            ex.released.set()
            with anyio.fail_after(TIMEOUT):
                await ex.done.wait()
    finally:
        ex.close()


async def request(app: Gateway, method: str, path: str, query: str = "", headers: Sequence[tuple[str, str]] = (),
                  pieces: Sequence[bytes] = (b"",)) -> Exchange:  # fmt: skip
    """A whole request: the app runs to its end before the client leaves."""
    async with exchange(app, method, path, query, headers, pieces) as ex:
        with anyio.fail_after(TIMEOUT):
            await ex.done.wait()
    if ex.sent:  # a complete response ends with a final body message
        assert ex.sent[-1]["type"] == "http.response.body" and not ex.sent[-1].get("more_body", False)
    return ex


def post_json(body: Any) -> dict[str, Any]:
    return {"headers": [("content-type", "application/json")], "pieces": [orjson.dumps(body)]}


def opening(stream_id: str) -> bytes:
    """A new stream's first body message: the retry line and the `stream` event."""
    return FIRST_CHUNK + b"event: stream\nid: %b.0\ndata: %b\n\n" % (stream_id.encode(), stream_id.encode())


def sse_events(body: bytes) -> list[tuple[str, str, str]]:
    response = httpx.Response(200, headers={"content-type": "text/event-stream; charset=utf-8"}, content=body)
    return [(e.event, e.data, e.id) for e in EventSource(response).iter_sse()]


# --- echo streaming ----------------------------------------------------------------------

MESSAGE = "  Hello,   world!\n\n\tThis is\u2028 a test:  data: x \n"


async def test_echo_streams_the_message_back_exactly_then_usage_then_done() -> None:
    app = Gateway(ENV)
    body = {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": MESSAGE}]}
    ex = await request(app, "POST", "/chat/stream", **post_json(body))
    assert ex.status == 200
    stream_id = ex.headers["x-stream-id"]
    assert ex.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert (ex.headers["cache-control"], ex.headers["x-accel-buffering"]) == ("no-cache", "no")
    opening, *events = sse_events(ex.body)
    assert opening == ("stream", stream_id, f"{stream_id}.0")  # the id before any token
    names = [name for name, _, _ in events]
    tokens = [data for name, data, _ in events if name == "token"]
    assert "".join(tokens) == MESSAGE and tokens == echo_tokens(MESSAGE) and len(tokens) > 5
    assert names == ["token"] * len(tokens) + ["usage", "done"]
    assert orjson.loads(events[-2][1]) == {"prompt_tokens": 2 + len(tokens), "completion_tokens": len(tokens),
                                           "total_tokens": 2 + 2 * len(tokens)}  # fmt: skip
    assert events[-1][1] == "stop"
    assert [event_id for _, _, event_id in events] == [f"{stream_id}.{n}" for n in range(1, len(events) + 1)]
    assert app.metrics.streams == {("echo", "stop"): 1} and app.metrics.active == 0
    await app.aclose()


async def test_echo_stops_at_max_tokens_with_finish_reason_length() -> None:
    app = Gateway(ENV)
    ex = await request(app, "GET", "/chat/stream", "prompt=one+two+three+four&max_tokens=2")
    events = sse_events(ex.body)
    assert [data for name, data, _ in events if name == "token"] == ["one ", "two "]
    assert events[-1][:2] == ("done", "length")
    assert orjson.loads(events[-2][1])["completion_tokens"] == 2
    await app.aclose()


async def test_echo_of_a_conversation_without_a_user_message_sends_no_tokens() -> None:
    app = Gateway(ENV)
    ex = await request(app, "POST", "/chat/stream", **post_json([{"role": "system", "content": "x"}]))
    assert [name for name, _, _ in sse_events(ex.body)] == ["stream", "usage", "done"]
    await app.aclose()


async def test_the_first_body_message_follows_the_headers_before_any_token() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "30"})
    async with exchange(app, "GET", "/chat/stream", "prompt=hi") as ex:
        start = await ex.next()
        assert (start["type"], start["status"]) == ("http.response.start", 200)
        assert await ex.next_body() == opening(ex.headers["x-stream-id"])
    await app.aclose()


async def test_heartbeats_are_sent_after_silence_also_before_the_first_token() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "30", "HEARTBEAT_SECONDS": "0.02"})
    async with exchange(app, "GET", "/chat/stream", "prompt=hi") as ex:
        await ex.next()
        assert await ex.next_body() == opening(ex.headers["x-stream-id"])
        assert [await ex.next_body() for _ in range(3)] == [HEARTBEAT] * 3
    assert app.metrics.streams == {("echo", "cancelled"): 1}
    await app.aclose()


async def test_a_heartbeat_is_a_comment_that_no_parser_turns_into_an_event() -> None:
    body = FIRST_CHUNK + HEARTBEAT + b"event: token\nid: s.1\ndata: x\n\n" + HEARTBEAT + HEARTBEAT
    assert sse_events(body) == [("token", "x", "s.1")]


async def test_a_client_disconnect_cancels_the_generation_at_once() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "0.01"})
    words = " ".join(f"w{i}" for i in range(2000))
    async with exchange(app, "POST", "/chat/stream", **post_json({"messages": [{"role": "user", "content": words}]})) as ex:
        await ex.next()
        await ex.next_body()
        first = await ex.next_body()
        assert first.startswith(b"event: token\n")
        ex.disconnect()
        with anyio.fail_after(TIMEOUT):
            await ex.done.wait()
    assert app.metrics.streams == {("echo", "cancelled"): 1}
    assert 0 < app.metrics.tokens["echo"] < 2000
    assert app.metrics.active == 0 and len(app.start().registry) == 1
    await app.aclose()


# --- lifespan -------------------------------------------------------------------------------


async def run_lifespan(app: Gateway, *messages: str) -> list[dict[str, Any]]:
    """Feed lifespan messages to the app; return what it answered."""
    queue = [{"type": m} for m in messages]
    answers: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not queue:
            await anyio.sleep_forever()
        return queue.pop(0)

    async def send(message: dict[str, Any]) -> None:
        answers.append(message)

    with anyio.fail_after(TIMEOUT):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    return answers


async def test_lifespan_startup_opens_the_shared_client_and_shutdown_closes_it() -> None:
    app = Gateway(ENV)
    queue: list[str] = ["lifespan.startup"]
    answers: list[dict[str, Any]] = []
    proceed = anyio.Event()

    async def receive() -> dict[str, Any]:
        if not queue:
            await proceed.wait()
            return {"type": "lifespan.shutdown"}
        return {"type": queue.pop(0)}

    async def send(message: dict[str, Any]) -> None:
        answers.append(message)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(app, {"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        with anyio.fail_after(TIMEOUT):
            while not answers:
                await anyio.sleep(0)
        assert answers == [{"type": "lifespan.startup.complete"}]
        client = app.start().http
        assert not client.is_closed
        ex = await request(app, "GET", "/chat/stream", "prompt=hi")
        assert app.start().http is client  # the one shared client served the request
        assert sse_events(ex.body)[-1][:2] == ("done", "stop")
        proceed.set()
    assert answers[-1] == {"type": "lifespan.shutdown.complete"}
    assert client.is_closed and app.start().http is client


async def test_lifespan_startup_fails_with_a_message_naming_the_variable() -> None:
    app = Gateway({"MAX_BODY_BYTES": "lots"})
    answers = await run_lifespan(app, "lifespan.startup")
    assert answers == [{"type": "lifespan.startup.failed", "message": "asgi-stream: MAX_BODY_BYTES='lots' is not an integer"}]


async def test_without_lifespan_the_client_is_opened_on_first_use() -> None:
    app = Gateway({**ENV, "OPENAI_API_KEY": "sk-x", "DEFAULT_BACKEND": "echo"})
    assert app.services is None  # nothing read, nothing opened
    ex = await request(app, "GET", "/chat/stream", "prompt=lazy")
    assert "".join(d for n, d, _ in sse_events(ex.body) if n == "token") == "lazy"
    assert app.services is not None and not app.services.http.is_closed
    await app.aclose()
    assert app.start().http.is_closed


async def test_a_ledger_is_written_and_closed_when_usage_db_is_set(tmp_path: Any) -> None:
    app = Gateway({**ENV, "USAGE_DB": str(tmp_path / "u.db")})
    await request(app, "GET", "/chat/stream", "prompt=a+b")
    await app.aclose()
    assert app.start().ledger is not None and app.start().ledger.closed
    assert app.start().ledger.summary() == [("-", "echo", "echo", 1, 2, 2, 4, 0)]


# --- refusals before the stream --------------------------------------------------------------


def error_of(ex: Exchange) -> tuple[int, str, str]:
    assert ex.headers["content-type"] == "application/json"
    assert ex.headers["cache-control"] == "no-store"
    assert int(ex.headers["content-length"]) == len(ex.body)
    error = orjson.loads(ex.body)["error"]
    assert set(error) == {"type", "message"}
    return ex.status, error["type"], error["message"]


async def test_an_unknown_path_is_404() -> None:
    ex = await request(Gateway(ENV), "GET", "/nope")
    assert error_of(ex) == (404, "not_found", "no route for /nope")


@pytest.mark.parametrize(("method", "path", "allow"), [("PUT", "/chat/stream", "GET, POST"), ("POST", "/healthz", "GET, HEAD"),
                                                       ("DELETE", "/metrics", "GET, HEAD"), ("GET", "/chat/stream/abc", "DELETE")])
async def test_a_wrong_method_is_405_with_allow(method: str, path: str, allow: str) -> None:
    ex = await request(Gateway(ENV), method, path)
    assert error_of(ex) == (405, "method_not_allowed", f"{path} allows {allow}")
    assert ex.headers["allow"] == allow


async def test_a_declared_content_length_over_the_limit_is_413_before_reading() -> None:
    ex = await request(Gateway({**ENV, "MAX_BODY_BYTES": "100"}), "POST", "/chat/stream",
                       headers=[("content-type", "application/json"), ("content-length", "101")], pieces=[b"x" * 101])
    assert error_of(ex)[:2] == (413, "payload_too_large")
    assert ex.taken == 0


async def test_a_body_growing_past_the_limit_is_413_and_reading_stops_there() -> None:
    pieces = [b"[" + b" " * 39, b" " * 40, b" " * 40, b" " * 40, b"]"]
    ex = await request(Gateway({**ENV, "MAX_BODY_BYTES": "100"}), "POST", "/chat/stream",
                       headers=[("content-type", "application/json")], pieces=pieces)
    assert error_of(ex) == (413, "payload_too_large", "the request body is larger than 100 bytes")
    assert ex.taken == 3  # 120 bytes read: past the limit, and not one piece more


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_a_post_that_is_not_json_is_415(content_type: str | None) -> None:
    headers = [("content-type", content_type)] if content_type else []
    ex = await request(Gateway(ENV), "POST", "/chat/stream", headers=headers, pieces=[b"{}"])
    assert error_of(ex) == (415, "unsupported_media_type", "POST bodies must be application/json")
    assert ex.taken == 0


@pytest.mark.parametrize(("body", "message"), [
    (b"{", "the request body is not valid JSON"),
    (b'{"messages": []}', "messages must be a non-empty array"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', "max_tokens must be an integer"),
])  # fmt: skip
async def test_an_invalid_request_is_400_saying_what_is_wrong(body: bytes, message: str) -> None:
    app = Gateway(ENV)
    ex = await request(app, "POST", "/chat/stream", headers=[("content-type", "application/json")], pieces=[body[:5], body[5:]])
    status, kind, text = error_of(ex)
    assert (status, kind) == (400, "invalid_request") and text.startswith(message)
    assert app.metrics.rejected == {"invalid_request": 1} and app.metrics.active == 0


async def test_a_client_leaving_during_the_body_gets_no_answer() -> None:
    app = Gateway(ENV)
    async with exchange(app, "POST", "/chat/stream", headers=[("content-type", "application/json")], pieces=[]) as ex:
        ex.disconnect()
        with anyio.fail_after(TIMEOUT):
            await ex.done.wait()
    assert ex.sent == [] and app.metrics.active == 0


# --- other routes -------------------------------------------------------------------------------


async def test_healthz_answers_ok() -> None:
    ex = await request(Gateway(ENV), "GET", "/healthz")
    assert (ex.status, ex.headers["content-type"], orjson.loads(ex.body)) == (200, "application/json", {"status": "ok"})


async def test_metrics_are_in_prometheus_text_format_and_count_streams() -> None:
    app = Gateway(ENV)
    await request(app, "GET", "/chat/stream", "prompt=a+b+c")
    await request(app, "GET", "/chat/stream", "prompt=x&max_tokens=nope")
    ex = await request(app, "GET", "/metrics")
    assert (ex.status, ex.headers["content-type"]) == (200, "text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(ex.body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("asgi_stream_active_streams", ())] == 0
    assert samples[("asgi_stream_held_streams", ())] == 1
    assert samples[("asgi_stream_streams_total", (("backend", "echo"), ("finish_reason", "stop")))] == 1
    assert samples[("asgi_stream_tokens_total", (("backend", "echo"),))] == 3
    assert samples[("asgi_stream_rejected_total", (("type", "invalid_request"),))] == 1
    assert samples[("asgi_stream_duration_seconds_count", ())] == 1
    assert samples[("asgi_stream_time_to_first_token_seconds_bucket", (("le", "+Inf"),))] == 1
    assert families["asgi_stream_duration_seconds"].type == "histogram"
    await app.aclose()


async def test_backends_lists_the_configured_backends_with_their_default_models() -> None:
    app = Gateway({**ENV, "ANTHROPIC_API_KEY": "sk-ant", "OLLAMA_BASE_URL": "http://ollama.example", "DEFAULT_MODEL": "claude-x"})
    ex = await request(app, "GET", "/backends")
    assert (ex.status, ex.headers["content-type"]) == (200, "application/json")
    assert orjson.loads(ex.body) == {"default_backend": "anthropic", "backends": [
        {"name": "echo", "default_model": "echo"}, {"name": "anthropic", "default_model": "claude-x"},
        {"name": "ollama", "default_model": "llama3.2"},
    ]}  # fmt: skip
    await app.aclose()


async def test_backends_needs_a_key_when_keys_are_set() -> None:
    app = Gateway({**ENV, "API_KEYS": "alice:key-a"})
    assert (await request(app, "GET", "/backends")).status == 401
    ex = await request(app, "GET", "/backends", headers=[("authorization", "Bearer key-a")])
    assert ex.status == 200 and orjson.loads(ex.body)["default_backend"] == "echo"
    await app.aclose()


async def test_the_index_page_is_html() -> None:
    ex = await request(Gateway(ENV), "GET", "/")
    assert (ex.status, ex.headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert ex.body.lstrip().lower().startswith(b"<!doctype html>")
    assert int(ex.headers["content-length"]) == len(ex.body)


# --- deadlines and upstream failures ------------------------------------------------------------


def tokens_of(body: bytes) -> str:
    return "".join(data for name, data, _ in sse_events(body) if name == "token")


def ending_of(body: bytes) -> tuple[list[str], dict[str, Any] | None, str]:
    """(event names after the tokens, the error object or None, the done reason)."""
    events = [(name, data) for name, data, _ in sse_events(body) if name not in ("stream", "token")]
    error = next((orjson.loads(data) for name, data in events if name == "error"), None)
    return [name for name, _ in events], error, events[-1][1]


async def test_no_first_token_within_the_deadline_ends_the_stream_with_a_timeout_error() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "30", "FIRST_TOKEN_TIMEOUT_SECONDS": "0.05"})
    ex = await request(app, "GET", "/chat/stream", "prompt=hi")
    names, error, reason = ending_of(ex.body)
    assert (names, reason) == (["error", "done"], "error")
    assert error == {"type": "timeout", "message": "first-token deadline: no token within 0.05 s"}
    assert app.metrics.upstream_errors == {"timeout": 1}
    await app.aclose()


async def test_a_generation_past_the_total_deadline_ends_with_a_timeout_error_and_estimated_usage() -> None:
    # 5000 tokens take 25 s; 2 s lets even a slow machine send some before the deadline
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "0.005", "TOTAL_TIMEOUT_SECONDS": "2"})
    ex = await request(app, "GET", "/chat/stream", "prompt=" + "+".join(["w"] * 5000))
    names, error, reason = ending_of(ex.body)
    assert (names, reason) == (["usage", "error", "done"], "error")
    assert error == {"type": "timeout", "message": "total deadline: the generation ran past 2 s"}
    usage = orjson.loads(next(d for n, d, _ in sse_events(ex.body) if n == "usage"))
    assert usage["estimated"] is True and 0 < usage["completion_tokens"] < 5000
    await app.aclose()


def raising_provider(exc: BaseException, tokens: int = 1) -> Any:
    async def provider(http: Any, upstream: Any, request: Any) -> AsyncIterator[str]:
        for _ in range(tokens):
            yield "tok "
        raise exc

    return provider


@pytest.mark.parametrize(("exc", "error_type", "message"), [
    (httpx.ReadTimeout("x"), "timeout", "upstream ReadTimeout"),  # none is set: the idle deadline is a cancel scope
    (httpx.ConnectTimeout("x"), "timeout", "connect deadline: no connection within 10 s"),
    (httpx.PoolTimeout("x"), "timeout", "upstream PoolTimeout"),
    (httpx.WriteTimeout("x"), "timeout", "upstream WriteTimeout"),
    (httpx.RemoteProtocolError("peer closed connection"), "protocol_error", "the upstream stream broke: peer closed connection"),
    (httpx.ReadError(""), "protocol_error", "the upstream stream broke: ReadError"),
    (LineTooLong("a line exceeded 9 bytes"), "protocol_error", "the upstream stream broke: a line exceeded 9 bytes"),
    # a provider failing on a shape it did not expect (a bug of ours, met by some upstream's bytes)
    (KeyError("choices"), "protocol_error", "the upstream stream could not be read (KeyError)"),
    (AttributeError("'list' object has no attribute 'get'"), "protocol_error", "the upstream stream could not be read (AttributeError)"),
])  # fmt: skip
async def test_upstream_failures_become_a_typed_error_event(exc: BaseException, error_type: str, message: str) -> None:
    app = Gateway(ENV)
    record = StreamRecord("s", None, ChatRequest([{"role": "user", "content": "hi"}], "echo", "echo", 9), 1 << 20)
    app.start().admission.admit(None)
    await Generation(app.start(), record, raising_provider(exc), app.start().config.upstreams["echo"]).run()
    names, error, reason = ending_of(record.read(0) or b"")
    assert (names, reason) == (["usage", "error", "done"], "error")
    assert error == {"type": error_type, "message": message}
    await app.aclose()


async def test_a_provider_failing_unexpectedly_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    app = Gateway(ENV)
    record = StreamRecord("s", None, ChatRequest([{"role": "user", "content": "hi"}], "echo", "echo", 9), 1 << 20)
    app.start().admission.admit(None)
    await Generation(app.start(), record, raising_provider(KeyError("choices")), app.start().config.upstreams["echo"]).run()
    failure = next(r for r in caplog.records if r.levelname == "ERROR")
    assert failure.exc_info is not None and failure.exc_info[0] is KeyError  # for whoever mends the provider
    assert "echo" in failure.getMessage()
    await app.aclose()


async def test_an_ending_that_cannot_be_written_still_ends_the_stream_and_is_accounted() -> None:
    # a provider bug: a round trip holding a value orjson cannot write (nested past 254 levels)
    nested: list[Any] = []
    for _ in range(300):
        nested = [nested]

    async def provider(http: Any, upstream: Any, request: Any) -> AsyncIterator[Any]:
        yield "a"
        yield Final("stop", None, RoundTrip([{"type": "reasoning.text", "text": "t", "format": nested}]))

    app = Gateway(ENV)
    record = StreamRecord("s", None, ChatRequest([{"role": "user", "content": "hi"}], "echo", "echo", 9), 1 << 20)
    app.start().admission.admit(None)
    unaccounted = app.start().admission.unaccounted
    await Generation(app.start(), record, provider, app.start().config.upstreams["echo"]).run()
    names, error, reason = ending_of(record.read(0) or b"")
    assert (names, reason) == (["usage", "error", "done"], "error")
    assert error == {"type": "protocol_error", "message": "the stream's ending could not be written"}
    assert record.finished and app.start().admission.unaccounted == unaccounted - 1  # accounted: the ledger row, the slot
    await app.aclose()


async def test_a_provider_ending_without_final_is_a_protocol_error() -> None:
    async def provider(http: Any, upstream: Any, request: Any) -> AsyncIterator[str]:
        yield "a"

    app = Gateway(ENV)
    record = StreamRecord("s", None, ChatRequest([{"role": "user", "content": "hi"}], "echo", "echo", 9), 1 << 20)
    app.start().admission.admit(None)
    await Generation(app.start(), record, provider, app.start().config.upstreams["echo"]).run()
    error = ending_of(record.read(0) or b"")[1]
    assert error == {"type": "protocol_error", "message": "the upstream stream ended without a final chunk"}
    await app.aclose()


async def test_an_upstream_error_message_never_carries_a_provider_key() -> None:
    app = Gateway({**ENV, "OPENAI_API_KEY": "sk-secret-1", "DEFAULT_BACKEND": "echo"})
    record = StreamRecord("s", None, ChatRequest([{"role": "user", "content": "hi"}], "echo", "echo", 9), 1 << 20)
    app.start().admission.admit(None)
    failure = UpstreamError("upstream_error", "bad key sk-secret-1 (sk-secret-1)", 401)
    await Generation(app.start(), record, raising_provider(failure, tokens=0), app.start().config.upstreams["echo"]).run()
    error = ending_of(record.read(0) or b"")[1]
    assert error == {"type": "upstream_error", "message": "bad key [redacted] ([redacted])", "status": 401}
    await app.aclose()


# --- clients that go away, stall or fall behind; server shutdown ----------------------------------

MANY_WORDS = "+".join(f"w{i}" for i in range(3000)) + "&max_tokens=5000"


@pytest.mark.parametrize("good_sends", [0, 1, 2, 5])  # headers, first chunk, events
async def test_a_send_that_fails_with_oserror_drops_the_reader_and_cancels_the_generation(good_sends: int) -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "0.005"})
    async with exchange(app, "GET", "/chat/stream", "prompt=" + MANY_WORDS, fail_sends_after=good_sends) as ex:
        with anyio.fail_after(TIMEOUT):
            await ex.done.wait()  # quietly: no exception escapes the app
    assert len(ex.sent) == good_sends
    assert app.metrics.streams == {("echo", "cancelled"): 1}  # not run to its end for nobody


async def test_a_generation_cancelled_before_it_started_does_not_run() -> None:
    app = Gateway(ENV)
    record = StreamRecord("s", None, ChatRequest([{"role": "user", "content": "a b c"}], "echo", "echo", 9), 1 << 20)
    app.start().admission.admit(None)
    assert record.cancel("client gone")
    await Generation(app.start(), record, config.BACKENDS["echo"].stream, app.start().config.upstreams["echo"]).run()
    assert ending_of(record.read(0) or b"") == (["done"], None, "cancelled")
    assert record.tokens == 0 and not record.cancel("again")
    await app.aclose()



async def test_a_client_that_takes_no_bytes_for_send_timeout_is_dropped() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "0.005", "SEND_TIMEOUT_SECONDS": "0.05"})
    async with exchange(app, "GET", "/chat/stream", "prompt=" + MANY_WORDS, hold_sends_after=2) as ex:
        with anyio.fail_after(TIMEOUT):
            await ex.done.wait()  # no disconnect, no release: the app gave up by itself
    assert len(ex.sent) == 2
    assert app.metrics.streams == {("echo", "cancelled"): 1}


async def test_a_reader_that_fell_behind_the_held_events_is_dropped_without_done() -> None:
    app = Gateway({**ENV, "STREAM_BUFFER_BYTES": "1024"})
    async with exchange(app, "GET", "/chat/stream", "prompt=" + MANY_WORDS, hold_sends_after=3) as ex:
        with anyio.fail_after(TIMEOUT):
            while not app.metrics.streams:  # the generation runs to its end meanwhile
                await anyio.sleep(0.001)
        ex.released.set()
        with anyio.fail_after(TIMEOUT):
            await ex.done.wait()
    assert app.metrics.streams == {("echo", "stop"): 1}
    assert ex.sent[-1]["more_body"] is True and b"event: done" not in ex.body


async def test_server_shutdown_tells_the_client_why_and_ends_the_stream() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "0.005"})
    ex = Exchange(make_scope("GET", "/chat/stream", "prompt=" + MANY_WORDS), [b""])
    with anyio.CancelScope() as server:  # a server cancels its request tasks at shutdown
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(app, ex.scope, ex.receive, ex.send)
            await ex.next()
            await ex.next_body()
            await ex.next_body()
            server.cancel()
    ex.close()
    assert ex.sent[-1]["more_body"] is False
    names, error, reason = ending_of(ex.body)
    assert (names, reason) == (["usage", "error", "done"], "error")
    assert error == {"type": "shutdown", "message": "the server is shutting down"}
    assert app.metrics.active == 0 and app.metrics.upstream_errors == {"shutdown": 1}


@pytest.mark.parametrize("fail_sends_after", [None, 0])
async def test_a_request_cancelled_before_its_generation_ran_is_still_accounted(fail_sends_after: int | None) -> None:
    app = Gateway({**ENV, "RESUME_GRACE_SECONDS": "5"})
    ex = Exchange(make_scope("GET", "/chat/stream", "prompt=hi"), [b""], fail_sends_after=fail_sends_after)
    with anyio.CancelScope() as server:
        server.cancel()  # shutdown at once; the client may be gone too
        await app(ex.scope, ex.receive, ex.send)
    ex.close()
    assert app.metrics.active == 0 and app.metrics.active_by_key == {}
    assert app.metrics.streams == {("echo", "error"): 1} and app.metrics.upstream_errors == {"shutdown": 1}


async def test_a_shutdown_after_done_went_out_sends_nothing_more() -> None:
    app = Gateway(ENV)
    ex = Exchange(make_scope("GET", "/chat/stream", "prompt=a+b"), [b""], hold_final=True)
    with anyio.CancelScope() as server:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(app, ex.scope, ex.receive, ex.send)
            with anyio.fail_after(TIMEOUT):
                while b"event: done" not in ex.body:
                    await ex.next()
            server.cancel()  # while the final (empty) body message is still being sent
    ex.close()
    assert ex.sent[-1]["more_body"] is True and ending_of(ex.body) == (["usage", "done"], None, "stop")
    assert app.metrics.streams == {("echo", "stop"): 1}


async def test_aclose_twice_is_harmless() -> None:
    app = Gateway(ENV)
    await request(app, "GET", "/chat/stream", "prompt=x")
    await app.aclose()
    await app.aclose()
    assert app.start().http.is_closed


# --- resume and cancel ---------------------------------------------------------------------------


async def test_a_resume_replays_what_followed_the_last_event_id_then_follows_the_generation() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "0.002", "RESUME_GRACE_SECONDS": "5"})
    message = " ".join(f"w{i}" for i in range(200))
    async with exchange(app, "GET", "/chat/stream", urlencode({"prompt": message})) as first:
        await first.next()
        await first.next_body()
        await first.next_body()
        first.disconnect()
        with anyio.fail_after(TIMEOUT):
            while app.start().registry.get(first.headers["x-stream-id"], None).readers:  # type: ignore[union-attr]
                await anyio.sleep(0.001)
        seen = sse_events(first.body)
        second = await request(app, "GET", "/chat/stream", headers=[("last-event-id", seen[-1][2])])
        with anyio.fail_after(TIMEOUT):
            await first.done.wait()
    assert second.status == 200 and second.headers["x-stream-id"] == first.headers["x-stream-id"]
    assert second.body.startswith(FIRST_CHUNK)
    resumed = sse_events(second.body)
    stream_id, _, last = seen[-1][2].rpartition(".")
    assert resumed[0][2] == f"{stream_id}.{int(last) + 1}"
    assert tokens_of(first.body) + tokens_of(second.body) == message
    assert resumed[-1][:2] == ("done", "stop") and app.metrics.streams == {("echo", "stop"): 1}
    # A finished stream: its final id is the end (204); an earlier id replays the rest.
    end = await request(app, "GET", "/chat/stream", headers=[("last-event-id", resumed[-1][2])])
    assert (end.status, end.body, "content-length" in end.headers) == (204, b"", False)  # RFC 9110: none on a 204
    again = await request(app, "GET", "/chat/stream", headers=[("last-event-id", resumed[-2][2])])
    assert sse_events(again.body) == resumed[-1:]
    await app.aclose()


async def test_a_generation_without_a_reader_is_cancelled_after_the_grace() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "0.005", "RESUME_GRACE_SECONDS": "0.05"})
    async with exchange(app, "GET", "/chat/stream", "prompt=" + MANY_WORDS) as ex:
        await ex.next()
        ex.disconnect()
        with anyio.fail_after(TIMEOUT):
            await ex.done.wait()
    assert app.metrics.streams == {("echo", "cancelled"): 1}
    record = app.start().registry.get(ex.headers["x-stream-id"], None)
    assert record is not None and record.cancel_reason == "client gone" and record.ever_disconnected


@pytest.mark.parametrize("last_event_id", ["nope", "abc.", "abc.x", "abc.-1", "abc.١", "unknown.1"])
async def test_a_resume_that_names_nothing_held_gets_204(last_event_id: str) -> None:
    ex = await request(Gateway(ENV), "GET", "/chat/stream", "prompt=not+started", headers=[("Last-Event-ID", last_event_id)])
    assert (ex.status, ex.body) == (204, b"")


async def test_a_resume_past_the_end_or_of_dropped_events_gets_204() -> None:
    app = Gateway({**ENV, "STREAM_BUFFER_BYTES": "1024"})
    ex = await request(app, "GET", "/chat/stream", "prompt=" + "+".join(["w"] * 200))
    stream_id = ex.headers["x-stream-id"]
    for position in (0, 1, 10_000):
        resumed = await request(app, "GET", "/chat/stream", headers=[("last-event-id", f"{stream_id}.{position}")])
        assert resumed.status == 204
    await app.aclose()


async def test_a_stream_is_not_resumable_with_resume_ttl_zero() -> None:
    app = Gateway({**ENV, "RESUME_TTL_SECONDS": "0"})
    ex = await request(app, "GET", "/chat/stream", "prompt=a+b")
    assert len(app.start().registry) == 0
    resumed = await request(app, "GET", "/chat/stream", headers=[("last-event-id", f"{ex.headers['x-stream-id']}.1")])
    assert resumed.status == 204
    await app.aclose()


async def test_delete_cancels_a_running_stream() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "30"})
    async with exchange(app, "GET", "/chat/stream", "prompt=hi") as ex:
        await ex.next()
        stream_id = ex.headers["x-stream-id"]
        cancel = await request(app, "DELETE", f"/chat/stream/{stream_id}")
        assert (cancel.status, cancel.body) == (204, b"")
        with anyio.fail_after(TIMEOUT):
            await ex.done.wait()
    assert ending_of(ex.body) == (["done"], None, "cancelled")
    again = await request(app, "DELETE", f"/chat/stream/{stream_id}")
    assert error_of(again) == (404, "not_found", "no running stream with this id")
    unknown = await request(app, "DELETE", "/chat/stream/nope")
    assert error_of(unknown)[0] == 404
    await app.aclose()


def test_the_registry_forgets_finished_streams_after_the_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(asgi_stream_core.stores.memory.time, "monotonic", lambda: clock[0])
    registry = StreamRegistry(ttl=10)
    running, finished = SimpleNamespace(id="r", key_name=None), SimpleNamespace(id="f", key_name="k")
    registry.add(running)  # type: ignore[arg-type]
    registry.add(finished)  # type: ignore[arg-type]
    registry.expire_later(finished)  # type: ignore[arg-type]
    assert registry.get("f", None) is None and registry.get("f", "k") is finished  # bound to its key
    clock[0] += 10.5
    assert registry.get("f", "k") is None and registry.get("r", None) is running and len(registry) == 1


def test_the_registry_sweeps_at_most_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(asgi_stream_core.stores.memory.time, "monotonic", lambda: clock[0])
    registry = StreamRegistry(ttl=0.1)
    record = SimpleNamespace(id="f", key_name=None)
    registry.add(record)  # type: ignore[arg-type]
    registry.expire_later(record)  # type: ignore[arg-type]
    clock[0] += 0.5
    assert registry.get("f", None) is record  # expired, but the last sweep was under a second ago
    clock[0] += 0.6
    assert registry.get("f", None) is None


# --- authentication, limits, CORS --------------------------------------------------------------

KEYS = {**ENV, "API_KEYS": "alice:key-a,bob:key-b"}


@pytest.mark.parametrize("credentials", [{}, {"headers": [("authorization", "Bearer wrong")]}, {"query": "access_token="},
                                         {"headers": [("authorization", "Basic key-a")]}, {"query": "access_token=key-"}])
async def test_without_a_valid_key_streams_and_metrics_are_401(credentials: dict[str, Any]) -> None:
    app = Gateway(KEYS)
    for path in ("/chat/stream", "/metrics"):
        query = credentials.get("query", "prompt=x")
        ex = await request(app, "GET", path, query, headers=credentials.get("headers", []))
        assert error_of(ex)[:2] == (401, "unauthorized") and ex.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("credentials", [{"headers": [("Authorization", "bearer  key-a ")]},
                                         {"query": "prompt=x&access_token=key-a"}])
async def test_a_valid_key_in_the_header_or_the_query_opens_the_stream(credentials: dict[str, Any]) -> None:
    app = Gateway(KEYS)
    ex = await request(app, "GET", "/chat/stream", credentials.get("query", "prompt=x"), headers=credentials.get("headers", []))
    assert ex.status == 200 and tokens_of(ex.body) == "x"
    assert (await request(app, "GET", "/healthz")).status == 200  # health and the page need no key
    assert (await request(app, "GET", "/")).status == 200
    await app.aclose()


async def test_a_stream_is_bound_to_the_key_that_started_it() -> None:
    app = Gateway(KEYS)
    ex = await request(app, "GET", "/chat/stream", "prompt=a+b&access_token=key-a")
    last_id = f"{ex.headers['x-stream-id']}.1"
    as_bob = await request(app, "GET", "/chat/stream", "access_token=key-b", headers=[("last-event-id", last_id)])
    assert as_bob.status == 204
    as_alice = await request(app, "GET", "/chat/stream", "access_token=key-a", headers=[("last-event-id", last_id)])
    assert as_alice.status == 200 and tokens_of(as_alice.body) == "b"
    await app.aclose()


async def test_beyond_max_streams_is_503_with_retry_after() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "30", "MAX_STREAMS": "1"})
    async with exchange(app, "GET", "/chat/stream", "prompt=hi") as ex:
        await ex.next()
        refused = await request(app, "GET", "/chat/stream", "prompt=hi")
        assert error_of(refused) == (503, "overloaded", "the server is at its limit of 1 streams")
        assert refused.headers["retry-after"] == "1"
    assert (await request(app, "GET", "/healthz")).status == 200
    await app.aclose()


async def test_beyond_max_streams_per_key_is_429_for_that_key_only() -> None:
    app = Gateway({**KEYS, "ECHO_DELAY_SECONDS": "30", "MAX_STREAMS_PER_KEY": "2"})
    alice = [("authorization", "Bearer key-a")]
    one = exchange(app, "GET", "/chat/stream", "prompt=1", alice)
    async with one, exchange(app, "GET", "/chat/stream", "prompt=2", alice) as two:
        await two.next()
        refused = await request(app, "GET", "/chat/stream", "prompt=3", alice)
        assert error_of(refused) == (429, "rate_limited", "this key is at its limit of 2 streams")
        assert refused.headers["retry-after"] == "1"
        async with exchange(app, "GET", "/chat/stream", "prompt=b", [("authorization", "Bearer key-b")]) as bob:
            assert (await bob.next())["status"] == 200
        assert app.metrics.active_by_key == {"alice": 2}
    assert app.metrics.active == 0 and app.metrics.active_by_key == {}
    await app.aclose()


CORS = {**ENV, "CORS_ORIGINS": "https://a.example"}


async def test_an_allowed_origin_gets_cors_headers_on_streams_and_errors() -> None:
    app = Gateway(CORS)
    ex = await request(app, "GET", "/chat/stream", "prompt=x", headers=[("Origin", "https://a.example")])
    assert ex.headers["access-control-allow-origin"] == "https://a.example"
    assert (ex.headers["vary"], ex.headers["access-control-expose-headers"]) == ("Origin", "X-Stream-ID")
    refused = await request(app, "GET", "/chat/stream", headers=[("Origin", "https://a.example")])
    assert refused.status == 400 and refused.headers["access-control-allow-origin"] == "https://a.example"
    other = await request(app, "GET", "/chat/stream", "prompt=x", headers=[("Origin", "https://b.example")])
    assert "access-control-allow-origin" not in other.headers
    await app.aclose()


async def test_any_origin_is_allowed_with_a_star() -> None:
    app = Gateway({**ENV, "CORS_ORIGINS": "*"})
    ex = await request(app, "GET", "/chat/stream", "prompt=x", headers=[("Origin", "https://z.example")])
    assert ex.headers["access-control-allow-origin"] == "https://z.example"
    await app.aclose()


async def test_no_cors_headers_without_cors_origins_or_before_settings_are_read() -> None:
    ex = await request(Gateway(ENV), "GET", "/nope", headers=[("Origin", "https://a.example")])
    assert ex.status == 404 and "access-control-allow-origin" not in ex.headers
    ex = await request(Gateway(ENV), "GET", "/chat/stream", "prompt=x", headers=[("Origin", "https://a.example")])
    assert ex.status == 200 and "access-control-allow-origin" not in ex.headers


async def test_a_preflight_from_an_allowed_origin_is_204_with_the_allowed_methods_and_headers() -> None:
    ex = await request(Gateway(CORS), "OPTIONS", "/chat/stream", headers=[("Origin", "https://a.example")])
    assert (ex.status, ex.body) == (204, b"")
    assert ex.headers["access-control-allow-origin"] == "https://a.example"
    assert ex.headers["access-control-allow-methods"] == "GET, POST, DELETE, OPTIONS"
    assert ex.headers["access-control-allow-headers"] == "Authorization, Content-Type, Last-Event-ID"
    assert ex.headers["access-control-max-age"] == "600"


@pytest.mark.parametrize(("env", "origin"), [(CORS, "https://b.example"), (CORS, None), (ENV, "https://a.example")])
async def test_a_preflight_from_another_origin_is_403(env: dict[str, str], origin: str | None) -> None:
    ex = await request(Gateway(env), "OPTIONS", "/chat/stream", headers=[("Origin", origin)] if origin else [])
    assert error_of(ex) == (403, "forbidden", "this origin is not allowed (CORS_ORIGINS)")


# --- the rest of the ASGI surface --------------------------------------------------------------


async def test_scopes_other_than_http_and_lifespan_are_ignored() -> None:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        raise AssertionError("not to be called")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await Gateway(ENV)({"type": "websocket", "path": "/"}, receive, send)
    assert sent == []


async def test_lifespan_ignores_unknown_messages() -> None:
    app = Gateway(ENV)
    answers = await run_lifespan(app, "lifespan.startup", "lifespan.something", "lifespan.shutdown")
    assert answers == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


async def test_a_ledger_that_cannot_be_written_is_logged_and_the_stream_still_completes(tmp_path: Any, caplog: Any) -> None:
    app = Gateway({**ENV, "USAGE_DB": str(tmp_path)})  # a directory: sqlite cannot open it
    ex = await request(app, "GET", "/chat/stream", "prompt=x")
    assert ending_of(ex.body)[2] == "stop"
    await app.aclose()
    assert any("usage ledger write failed" in r.getMessage() for r in caplog.records)
    assert any("usage ledger: 1 rows could not be written" in r.getMessage() for r in caplog.records)


async def test_heartbeats_keep_their_pace_after_a_send_that_was_held_for_a_while() -> None:
    # a watcher that saw a send under way used to look again only at the send
    # timeout: after one slow send, the next heartbeat came up to SEND_TIMEOUT late
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "60", "HEARTBEAT_SECONDS": "0.05", "SEND_TIMEOUT_SECONDS": "60"})
    async with exchange(app, "GET", "/chat/stream", "prompt=hi", hold_sends_after=2) as ex:  # from the first heartbeat on
        await ex.next()
        assert await ex.next_body() == opening(ex.headers["x-stream-id"])
        await anyio.sleep(0.5)  # the watcher wakes meanwhile and finds the heartbeat's send under way
        ex.released.set()
        assert [await ex.next_body() for _ in range(3)] == [HEARTBEAT] * 3  # each within TIMEOUT, far below 60 s
    await app.aclose()


async def test_a_client_that_takes_no_heartbeat_for_send_timeout_is_dropped() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "30", "HEARTBEAT_SECONDS": "0.02", "SEND_TIMEOUT_SECONDS": "0.1"})
    async with exchange(app, "GET", "/chat/stream", "prompt=hi", hold_sends_after=2) as ex:
        with anyio.fail_after(TIMEOUT):
            await ex.done.wait()  # the blocked heartbeat is given up like any blocked send
    assert len(ex.sent) == 2
    assert app.metrics.streams == {("echo", "cancelled"): 1}
