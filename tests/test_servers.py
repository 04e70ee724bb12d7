"""The end-to-end contract on every ASGI server we support: `asgi_stream:app`
served by uvicorn, hypercorn (asyncio and trio workers), granian and daphne,
each a real subprocess on 127.0.0.1, with the echo backend and the openai
backend against a fake upstream. One server process per server per module."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import EventSource

from tests.conftest import stream
from tests.servers import GRACE, SERVERS, Process, body_of, open_stream, post_request, read_until, run_server
from tests.upstream import FakeUpstream, Reply, Seen, sse_tokens

WORDS = [f" w{i}" for i in range(400)]
SEND_TIMEOUT = 1.0  # seconds a client may take no bytes before the gateway drops it
HEARTBEAT = 0.15  # seconds; the "drip" upstream is silent for 0.4 s between tokens


def respond(seen: Seen) -> Reply:
    """The fake upstream's script, chosen by the prompt."""
    prompt = seen.json["messages"][-1]["content"]
    if prompt == "slow":  # goes on for 20 s unless the gateway hangs up
        return sse_tokens(WORDS, pause=0.05)
    if prompt == "flood":  # 8 MB at once, then silence: more than any socket buffer holds
        reply = sse_tokens(["x" * 4096] * 2048)
        reply.pieces = reply.pieces[:-2]  # no finish, no [DONE]
        reply.end = "hang"
        return reply
    if prompt == "drip":  # three tokens, 0.4 s apart
        return sse_tokens(["a", "b", "c"], pause=0.4)
    return sse_tokens(["Hello", " world"], usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(respond) as fake:
        yield fake


@pytest.fixture(scope="module", params=list(SERVERS))
def served(request: pytest.FixtureRequest, upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": upstream.url + "/v1",
        "DEFAULT_BACKEND": "echo",
        "MAX_BODY_BYTES": "1000",
        "RESUME_GRACE_SECONDS": "0",
        "HEARTBEAT_SECONDS": str(HEARTBEAT),
        "SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT),
        # holds the whole 8 MB "flood": a client that falls behind the held events is dropped
        # (by design, whatever the server), which would blur what the send timeout does
        "STREAM_BUFFER_BYTES": str(16 << 20),
        # and its 2,048 tokens stay under max_tokens: the cut at max_tokens would end it (and its upstream) too
        "MAX_TOKENS": "4096",
    }
    with run_server(request.param, env, tmp_path_factory.mktemp(request.param)) as process:
        yield process


def openai_body(prompt: str) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": prompt}], "backend": "openai"}).encode()


def seen_for(upstream: FakeUpstream, prompt: str, since: int) -> Seen:
    assert upstream.wait_for(lambda: any(s.json["messages"][-1]["content"] == prompt for s in upstream.seen[since:]), 30)
    return next(s for s in upstream.seen[since:] if s.json["messages"][-1]["content"] == prompt)


def test_echo_streams_a_post_json_object(served: Process) -> None:
    result = stream("POST", served.url + "/chat/stream", json={"messages": [{"role": "user", "content": "Hello there, server"}]})
    assert result.status == 200
    assert result.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert result.headers["x-accel-buffering"] == "no" and result.headers["cache-control"] == "no-cache"
    assert result.text == "Hello there, server"
    assert result.names[-2:] == ["usage", "done"] and result.of("done") == ["stop"]
    stream_id = result.headers["x-stream-id"]
    assert [i for _, _, i in result.events] == [f"{stream_id}.{n}" for n in range(1, len(result.events) + 1)]


def test_a_bare_array_takes_backend_and_max_tokens_from_the_query(served: Process) -> None:
    messages = [{"role": "user", "content": "one two three four"}]
    result = stream("POST", served.url + "/chat/stream?backend=echo&max_tokens=2", json=messages)
    assert result.text == "one two "
    assert result.of("done") == ["length"]


def test_get_with_a_prompt_streams_like_eventsource_asks(served: Process) -> None:
    result = stream(
        "GET",
        served.url + "/chat/stream",
        params={"prompt": "é 🙂 ok", "backend": "echo"},
        headers={"accept": "text/event-stream"},
    )
    assert result.status == 200 and result.text == "é 🙂 ok" and result.of("done") == ["stop"]


def test_the_openai_backend_streams_the_upstream_tokens_and_usage(served: Process) -> None:
    result = stream("POST", served.url + "/chat/stream", content=openai_body("hi"), headers={"content-type": "application/json"})
    assert result.of("token") == ["Hello", " world"]
    assert json.loads(result.of("usage")[0])["total_tokens"] == 5
    assert result.names[-1] == "done" and result.of("done") == ["stop"]


def test_the_first_token_arrives_while_the_upstream_is_still_generating(served: Process, upstream: FakeUpstream) -> None:
    since = len(upstream.seen)
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", served.url + "/chat/stream", content=openai_body("drip"), headers={"content-type": "application/json"}
        ) as response,
    ):
        chunks = response.iter_raw()
        received = b""
        while b"event: token" not in received:
            received += next(chunks)
        assert b"data: a\n" in received
        assert not seen_for(upstream, "drip", since).completed  # the upstream has not finished yet
        rest = b"".join(chunks)
    assert b"event: done\n" in rest and b"data: c\n" in rest


def test_heartbeats_flow_while_the_upstream_is_silent(served: Process) -> None:
    with open_stream(served.url, post_request("/chat/stream", openai_body("drip"))) as sock:
        raw = read_until(sock, lambda got: b"event: done" in body_of(got))
    body = body_of(raw)
    between = body[body.index(b"data: a\n") : body.index(b"data: b\n")]
    assert between.count(b"\n:\n") >= 1  # a comment line, written while the upstream was silent
    assert b"\n\n:\n\n" not in body  # never followed by a blank line (that would dispatch in some parsers)


def test_last_event_id_replays_a_running_stream_and_follows_it(served: Process) -> None:
    with open_stream(served.url, post_request("/chat/stream", openai_body("slow"))) as first:
        head = read_until(first, lambda got: body_of(got).count(b"event: token") >= 4)
        stream_id, third = re.findall(rb"id: ([\w-]+)\.(\d+)", body_of(head))[3]  # [0]: the opening `stream` event
        assert third == b"3"
        with (
            httpx.Client(timeout=10) as client,
            client.stream("GET", served.url + "/chat/stream", headers={"last-event-id": f"{stream_id.decode()}.3"}) as response,
        ):
            assert response.status_code == 200 and response.headers["x-stream-id"] == stream_id.decode()
            events = EventSource(response).iter_sse()
            resumed = [next(events) for _ in range(6)]
    assert [e.id for e in resumed] == [f"{stream_id.decode()}.{n}" for n in range(4, 10)]
    assert [e.data for e in resumed] == WORDS[3:9]


def test_last_event_id_of_a_finished_stream_gets_204(served: Process) -> None:
    done = stream("GET", served.url + "/chat/stream?prompt=over")
    last_id = done.events[-1][2]
    assert done.names[-1] == "done"
    assert httpx.get(served.url + "/chat/stream", headers={"last-event-id": last_id}).status_code == 204


TOO_LARGE = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()  # MAX_BODY_BYTES is 1000 here


@pytest.mark.parametrize(("method", "path", "body", "content_type", "status", "error_type"), [
    ("POST", "/chat/stream", b"{not json", "application/json", 400, "invalid_request"),
    ("POST", "/chat/stream", b'{"messages": []}', "application/json", 400, "invalid_request"),
    ("GET", "/nowhere", b"", None, 404, "not_found"),
    ("PUT", "/chat/stream", b"{}", "application/json", 405, "method_not_allowed"),
    ("POST", "/chat/stream", TOO_LARGE, "application/json", 413, "payload_too_large"),
    ("POST", "/chat/stream", b"prompt=hi", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
])  # fmt: skip
def test_refusals_before_the_stream_are_json_errors(
    served: Process, method: str, path: str, body: bytes, content_type: str | None, status: int, error_type: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.request(method, served.url + path, content=body or None, headers=headers, timeout=10)
    assert response.status_code == status
    assert response.json()["error"]["type"] == error_type
    if status == 405:
        assert response.headers["allow"] == "GET, POST"


def test_a_client_that_leaves_cancels_the_upstream_request(served: Process, upstream: FakeUpstream) -> None:
    since = len(upstream.seen)
    with open_stream(served.url, post_request("/chat/stream", openai_body("slow"))) as sock:
        read_until(sock, lambda got: got.count(b"event: token") >= 3)
    closed_at = time.monotonic()
    seen = seen_for(upstream, "slow", since)
    assert upstream.wait_for(lambda: seen.closed_by_client is not None, 30), "the upstream request was never closed"
    assert seen.closed_by_client is not None and seen.closed_by_client - closed_at < 10  # long before the 20 s reply ends
    assert not seen.completed


def test_a_client_that_stops_reading_is_dropped_where_send_can_be_timed_out(served: Process, upstream: FakeUpstream) -> None:
    """SEND_TIMEOUT_SECONDS drops a client that takes no bytes, and the
    upstream is cancelled. Not on hypercorn's trio worker (it shields a
    blocked send from cancellation) nor on daphne (send never blocks: daphne
    buffers everything): there the client stays until it reads or leaves.
    (With the default 1 MiB STREAM_BUFFER_BYTES such a client is dropped
    there too once it falls behind the held events, at a moment that depends
    on the machine's speed: under `slowly -n 4`, after 0.4 s, in one full run of five.)"""
    since = len(upstream.seen)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(("127.0.0.1", served.port))
    with sock:
        sock.sendall(post_request("/chat/stream", openai_body("flood")))
        seen = seen_for(upstream, "flood", since)
        dropped = upstream.wait_for(lambda: seen.closed_by_client is not None, SEND_TIMEOUT + 2)
        if served.name in ("hypercorn-trio", "daphne"):
            assert not dropped
        else:
            assert dropped, "the stalled client was never dropped"
    assert upstream.wait_for(lambda: seen.closed_by_client is not None, 30)  # leaving always cancels


def test_delete_stops_a_running_generation_with_done_cancelled(served: Process) -> None:
    with open_stream(served.url, post_request("/chat/stream", openai_body("slow"))) as sock:
        head = read_until(sock, lambda got: b"event: token" in got)
        stream_id = next(
            line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"x-stream-id:")
        )
        assert httpx.delete(f"{served.url}/chat/stream/{stream_id.decode()}", timeout=5).status_code == 204
        body = body_of(head + read_until(sock, lambda got: b"event: done" in body_of(head + got)))
    assert re.search(rb"event: done\nid: [\w-]+\.\d+\ndata: cancelled\n\n$", body)


def test_health_and_metrics_answer(served: Process) -> None:
    assert httpx.get(served.url + "/healthz").json() == {"status": "ok"}
    metrics = httpx.get(served.url + "/metrics")
    assert metrics.status_code == 200 and "asgi_stream_active_streams" in metrics.text


# --- shutdown with a stream open -------------------------------------------------


@pytest.mark.parametrize("name", list(SERVERS))
def test_sigterm_with_a_stream_open_tells_the_client_why_it_ends(name: str, upstream: FakeUpstream, tmp_path: Path) -> None:
    """Every server but granian cancels the app at shutdown (after its grace,
    daphne at once); the app then writes `error` (type shutdown) and `done`
    and the response ends cleanly. granian never tells the app: it waits for
    the stream, then kills the worker after --workers-kill-timeout, so the
    client sees the connection cut mid-stream (EventSource would reconnect)."""
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream.url + "/v1"}
    since = len(upstream.seen)
    with run_server(name, env, tmp_path) as process:
        with open_stream(process.url, post_request("/chat/stream", openai_body("slow"))) as sock:
            head = read_until(sock, lambda got: got.count(b"event: token") >= 2)
            process.popen.terminate()
            started = time.monotonic()
            rest = read_until(sock, lambda got: False, limit=GRACE + 30)  # to EOF
            ended_after = time.monotonic() - started
        exit_code = process.popen.wait(GRACE + 30)
    assert exit_code in (0, -signal.SIGTERM), (exit_code, process.output())  # uvicorn re-raises SIGTERM once it has shut down
    body = body_of(head + rest)
    assert ended_after < GRACE + 20  # ended by the grace, not by the test giving up (slow machines: generous)
    assert not seen_for(upstream, "slow", since).completed
    if name == "granian":
        assert b"event: done" not in body and not rest.endswith(b"0\r\n\r\n")
        assert ended_after > GRACE - 0.5  # it waited for the stream, then killed the worker
        return
    assert re.search(
        rb'event: error\nid: \S+\ndata: \{"type":"shutdown","message":"[^"]+"\}\n\nevent: done\nid: \S+\ndata: error\n\n$', body
    )
    assert rest.endswith(b"0\r\n\r\n")  # a complete chunked response, not a cut


@pytest.mark.parametrize("name", list(SERVERS))
def test_an_invalid_setting_never_passes_for_healthy(name: str, tmp_path: Path) -> None:
    """With lifespan the server refuses to start; daphne has none, so the
    settings are read at the first request, and /healthz is that request."""
    with pytest.raises(AssertionError) as failed, run_server(name, {"MAX_TOKENS": "many"}, tmp_path):
        pass
    assert "MAX_TOKENS='many' is not an integer" in str(failed.value)


def test_daphne_cuts_the_resume_grace_at_its_application_close_timeout(upstream: FakeUpstream, tmp_path: Path) -> None:
    """daphne cancels an app instance --application-close-timeout seconds
    after its client left, whatever RESUME_GRACE_SECONDS says: keep the
    timeout above the grace (README)."""
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream.url + "/v1", "RESUME_GRACE_SECONDS": "30"}
    command = [*SERVERS["daphne"], "--application-close-timeout", "1"]
    since = len(upstream.seen)
    with run_server("daphne", env, tmp_path, command) as process:
        with open_stream(process.url, post_request("/chat/stream", openai_body("slow"))) as sock:
            read_until(sock, lambda got: got.count(b"event: token") >= 2)
        left = time.monotonic()
        seen = seen_for(upstream, "slow", since)
        assert upstream.wait_for(lambda: seen.closed_by_client is not None, 30)
    assert seen.closed_by_client is not None and 0.5 < seen.closed_by_client - left < 4  # not the 30 s grace
