"""The gateway driven in-process, on asyncio and on trio, by a small ASGI
driver written here: it hands the app scope/receive/send, exposes every
message the app sends as it is sent, and can inject `http.disconnect`.
(httpx's ASGITransport cannot: it waits for the whole response.)"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import orjson
import pytest
from httpx_sse import EventSource
from prometheus_client.parser import text_string_to_metric_families

from asgi_stream import FIRST_CHUNK, HEARTBEAT, Gateway
from providers.echo import echo_tokens

pytestmark = pytest.mark.anyio

ENV = {"USAGE_DB": "", "RESUME_GRACE_SECONDS": "0"}
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
        "root_path": "", "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip


@asynccontextmanager
async def exchange(app: Gateway, method: str, path: str, query: str = "", headers: Sequence[tuple[str, str]] = (),
                   pieces: Sequence[bytes] = (b"",)) -> AsyncIterator[Exchange]:  # fmt: skip
    """Run the app on one request while the caller watches; on exit the
    client disconnects (if the app is still running) and the app must end."""
    ex = Exchange(make_scope(method, path, query, headers), list(pieces))

    async def run() -> None:
        await app(ex.scope, ex.receive, ex.send)
        ex.done.set()

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run)
            yield ex
            ex.disconnect()
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
    events = sse_events(ex.body)
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
    assert [name for name, _, _ in sse_events(ex.body)] == ["usage", "done"]
    await app.aclose()


async def test_the_first_body_message_follows_the_headers_before_any_token() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "30"})
    async with exchange(app, "GET", "/chat/stream", "prompt=hi") as ex:
        start = await ex.next()
        assert (start["type"], start["status"]) == ("http.response.start", 200)
        assert await ex.next_body() == FIRST_CHUNK
    await app.aclose()


async def test_heartbeats_are_sent_after_silence_also_before_the_first_token() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "30", "HEARTBEAT_SECONDS": "0.02"})
    async with exchange(app, "GET", "/chat/stream", "prompt=hi") as ex:
        await ex.next()
        assert await ex.next_body() == FIRST_CHUNK
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
    assert app.metrics.active == 0 and len(app.registry) == 1
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
        client = app.http
        assert not client.is_closed
        ex = await request(app, "GET", "/chat/stream", "prompt=hi")
        assert app.http is client  # the one shared client served the request
        assert sse_events(ex.body)[-1][:2] == ("done", "stop")
        proceed.set()
    assert answers[-1] == {"type": "lifespan.shutdown.complete"}
    assert client.is_closed and app._http is None


async def test_lifespan_startup_fails_with_a_message_naming_the_variable() -> None:
    app = Gateway({"MAX_BODY_BYTES": "lots"})
    answers = await run_lifespan(app, "lifespan.startup")
    assert answers == [{"type": "lifespan.startup.failed", "message": "asgi-stream: MAX_BODY_BYTES='lots' is not an integer"}]


async def test_without_lifespan_the_client_is_opened_on_first_use() -> None:
    app = Gateway({**ENV, "OPENAI_API_KEY": "sk-x", "DEFAULT_BACKEND": "echo"})
    assert app._http is None and app._config is None
    ex = await request(app, "GET", "/chat/stream", "prompt=lazy")
    assert "".join(d for n, d, _ in sse_events(ex.body) if n == "token") == "lazy"
    assert app._http is not None and not app._http.is_closed
    await app.aclose()
    assert app._http is None


async def test_a_ledger_is_written_and_closed_when_usage_db_is_set(tmp_path: Any) -> None:
    app = Gateway({**ENV, "USAGE_DB": str(tmp_path / "u.db")})
    await request(app, "GET", "/chat/stream", "prompt=a+b")
    assert app.ledger is not None
    assert app.ledger.summary() == [("-", "echo", "echo", 1, 2, 2, 4, 0)]
    await app.aclose()
    assert app.ledger._db is None


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


@pytest.mark.parametrize(("method", "path", "allow"), [("PUT", "/chat/stream", "GET, POST"), ("POST", "/healthz", "GET"),
                                                       ("DELETE", "/metrics", "GET"), ("GET", "/chat/stream/abc", "DELETE")])
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


async def test_the_index_page_is_html() -> None:
    ex = await request(Gateway(ENV), "GET", "/")
    assert (ex.status, ex.headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert ex.body.lstrip().lower().startswith(b"<!doctype html>")
    assert int(ex.headers["content-length"]) == len(ex.body)
