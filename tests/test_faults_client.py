"""Client faults against a real uvicorn: storms of clients leaving at once, a
client that stops reading, bodies that trickle in or never end, oversize
and malformed requests. Only 4xx, never 5xx, never a hang; and after each,
nothing left behind inside the gateway."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import asgi_stream
from asgi_stream_core import ledger
from tests.faultkit import Probed, probe, serve_probed, usage_rows, wait_until
from tests.upstream import FakeUpstream, Reply

KEY = "sk-client-faults-SECRET"


def chunk(token: str) -> bytes:
    body = {"choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def endless(token: str = " tick", pause: float = 0.05) -> Reply:
    return Reply(pieces=[chunk("first")], repeat=[pause, chunk(token)])


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def post_head(body_length: int | None, extra: bytes = b"") -> bytes:
    length = b"" if body_length is None else b"content-length: %d\r\n" % body_length
    return b"POST /chat/stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" + length + extra + b"\r\n"


def read_reply(sock: socket.socket, timeout: float = 60.0) -> bytes:
    """Everything the server sends until it closes or completes a response;
    a server that does neither within `timeout` hangs, and fails the test."""
    sock.settimeout(timeout)
    received = b""
    try:
        while piece := sock.recv(65536):
            received += piece
            if b"\r\n\r\n" in received and _complete(received):
                break
    except TimeoutError:
        raise AssertionError(f"the server neither answered nor closed within {timeout} s; got {received[:300]!r}") from None
    except ConnectionResetError:
        pass
    return received


def _complete(reply: bytes) -> bool:
    head, _, body = reply.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        return body.endswith(b"\r\n0\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def tokens_of(reply: bytes) -> list[str]:
    """The token events of a raw chunked SSE reply (tokens here are single-line)."""
    body = reply.partition(b"\r\n\r\n")[2]
    text = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        text, body = text + rest[:length], rest[length + 2 :]
    events = [dict(line.split(": ", 1) for line in block.split("\n") if ": " in line) for block in text.decode().split("\n\n")]
    return [event["data"] for event in events if event.get("event") == "token"]


def status_of(reply: bytes) -> int | None:
    return int(reply[9:12]) if reply.startswith(b"HTTP/1.1 ") else None


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(lambda seen: endless()) as fake:
        yield fake


# --- the probes themselves: they must see what is alive, or their zeros mean nothing


def test_the_leak_probe_sees_a_running_stream_and_its_pooled_connection(upstream: FakeUpstream) -> None:
    with serve_probed({"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": upstream.url + "/v1"}) as gw:
        with (
            httpx.Client(timeout=5) as client,
            client.stream("POST", gw.url + "/chat/stream", json={"messages": [{"role": "user", "content": "x"}]}) as response,
        ):
            lines = response.iter_lines()
            while next(lines) != "event: token":
                pass
            alive = probe(gw.served)
            assert (alive.active_streams, alive.readers, alive.running_generations) == (1, 1, 1)
            assert (alive.pool_requests, alive.busy_connections, alive.server_connections) == (1, 1, 1)
            assert alive.tasks > gw.baseline_tasks
        gw.nothing_left()
        assert upstream.wait_for(lambda: upstream.open_connections == 0)


# --- disconnect storms

STORM = 300


async def _storm(url: str, clients: int) -> float:
    """`clients` streams, each left at once after its first token; returns when they left."""
    host, port = host_port(url)
    body = json.dumps({"messages": [{"role": "user", "content": "storm"}]}).encode()

    async def first_token() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(post_head(len(body)) + body)
        await reader.readuntil(b"event: token")
        return writer

    writers = await asyncio.wait_for(asyncio.gather(*(first_token() for _ in range(clients))), 30)
    for writer in writers:  # everyone leaves at once
        writer.transport.abort()
    return time.monotonic()


def test_a_disconnect_storm_closes_every_upstream_and_leaves_nothing_behind(upstream: FakeUpstream, tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    env = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": upstream.url + "/v1", "USAGE_DB": str(db)}
    with serve_probed(env) as gw:
        asyncio.run(_storm(gw.url, STORM))
        assert upstream.wait_for(lambda: upstream.open_connections == 0, 30), f"{upstream.open_connections} upstreams still open"
        assert len(upstream.seen) == STORM
        assert all(seen.closed_by_client is not None and not seen.completed for seen in upstream.seen)
        gw.nothing_left(60)
        ok = httpx.post(
            gw.url + "/chat/stream", json={"messages": [{"role": "user", "content": "after"}], "backend": "echo"}, timeout=5
        )
        assert ok.status_code == 200 and ok.text.rstrip().endswith("data: stop")
        gw.nothing_left()
    rows = [row for row in usage_rows(db) if row["backend"] == "openai"]
    assert len(rows) == STORM  # nothing lost: one row per stream
    assert {(row["finish_reason"], row["client_disconnected"]) for row in rows} == {("cancelled", 1)}
    assert all(row["completion_tokens"] >= 1 for row in rows)


# --- a client that stops reading


def test_a_client_that_stops_reading_is_dropped_and_its_stream_memory_stays_bounded(tmp_path: Path) -> None:
    buffer_limit = 64 * 1024
    big = endless("x" * 2000, pause=0.0005)
    db = tmp_path / "usage.db"
    with FakeUpstream(lambda seen: big) as upstream:
        env = {
            "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": upstream.url + "/v1", "USAGE_DB": str(db),
            "STREAM_BUFFER_BYTES": str(buffer_limit), "SEND_TIMEOUT_SECONDS": "0.5",
        }  # fmt: skip
        with serve_probed(env) as gw:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(host_port(gw.url))
            # max_tokens far above what arrives before the send timeout: the upstream is cut there since issue 23
            body = json.dumps({"messages": [{"role": "user", "content": "flood me"}], "max_tokens": 8192}).encode()
            sock.sendall(post_head(len(body)) + body)  # and never read a byte
            held: list[int] = []
            started = time.monotonic()

            def ended() -> bool:
                records = list(gw.gateway.start().registry._streams.values())
                held.extend(r.log._held for r in records)  # framed bytes of the held events
                return bool(records) and gw.gateway.metrics.active == 0

            assert wait_until(ended, 60)
            took = time.monotonic() - started
            assert upstream.wait_for(lambda: upstream.open_connections == 0, 30)
            assert upstream.bytes_sent > 20 * buffer_limit  # the generation ran on while the client stalled...
            assert max(held) <= buffer_limit + 4096  # ...yet the stream held at most its buffer (plus one event)
            assert 0.5 <= took < 30  # ended by SEND_TIMEOUT_SECONDS, not by anything sooner (generous above: slow machines)
            alive = probe(gw.served)
            assert (alive.readers, alive.running_generations, alive.pool_requests, alive.busy_connections) == (0, 0, 0, 0)
            sock.close()
            gw.nothing_left()
    (row,) = usage_rows(db)
    assert row["finish_reason"] == "cancelled" and row["completion_tokens"] > 20


# --- request bodies that trickle in, never end, or are too large

ECHO = {"MAX_BODY_BYTES": "4096", "BODY_TIMEOUT_SECONDS": "0.5"}


@pytest.fixture
def echo_gateway() -> Iterator[Probed]:
    with serve_probed(ECHO) as gw:
        yield gw
        gw.nothing_left()


def test_a_body_sent_byte_by_byte_streams_normally(echo_gateway: Probed) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "one byte at a time"}]}).encode()
    with socket.create_connection(host_port(echo_gateway.url)) as sock:
        sock.sendall(post_head(len(body)))
        for i in range(len(body)):
            sock.sendall(body[i : i + 1])
            time.sleep(0.001)
        sock.settimeout(5)
        reply = b""
        while b"data: stop" not in reply:
            piece = sock.recv(65536)
            assert piece, reply
            reply += piece
    assert status_of(reply) == 200
    assert "".join(tokens_of(reply)) == "one byte at a time"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_that_never_finishes_gets_408_at_the_body_deadline(echo_gateway: Probed, framing: str) -> None:
    with socket.create_connection(host_port(echo_gateway.url)) as sock:
        if framing == "chunked":
            sock.sendall(post_head(None, b"transfer-encoding: chunked\r\n") + b'5\r\n{"mes')
        else:
            sock.sendall(post_head(100) + b'{"messages"')
        started = time.monotonic()
        reply = read_reply(sock)
    assert status_of(reply) == 408, reply[:200]
    assert b'"type":"request_timeout"' in reply
    assert 0.4 < time.monotonic() - started < 30  # the 0.5 s body deadline, not sooner (generous above: slow machines)


def test_a_content_length_above_the_limit_gets_413_before_the_body_is_sent(echo_gateway: Probed) -> None:
    with socket.create_connection(host_port(echo_gateway.url)) as sock:
        sock.sendall(post_head(10_000_000))
        reply = read_reply(sock)
    assert status_of(reply) == 413 and b"payload_too_large" in reply


def test_a_chunked_body_without_content_length_gets_413_once_it_passes_the_limit(echo_gateway: Probed) -> None:
    with socket.create_connection(host_port(echo_gateway.url)) as sock:
        sock.sendall(post_head(None, b"transfer-encoding: chunked\r\n"))
        reply = b""
        try:
            for _ in range(64):  # 64 KiB offered against a 4 KiB limit, never finished
                sock.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = read_reply(sock)
    assert status_of(reply) == 413, reply[:200]


def test_a_lying_content_length_is_refused_with_4xx(echo_gateway: Probed) -> None:
    """Content-Length says 2 bytes; the client sends 5000 (a smuggling attempt)."""
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    with socket.create_connection(host_port(echo_gateway.url)) as sock:
        sock.sendall(post_head(2) + body)
        reply = read_reply(sock)
    statuses = [int(part[:3]) for part in reply.split(b"HTTP/1.1 ")[1:]]
    assert statuses and all(400 <= s < 500 for s in statuses), reply[:300]


def test_content_length_together_with_chunked_is_refused_with_4xx(echo_gateway: Probed) -> None:
    with socket.create_connection(host_port(echo_gateway.url)) as sock:
        sock.sendall(post_head(3, b"transfer-encoding: chunked\r\n") + b"2000\r\n" + b"[" * 8192 + b"\r\n0\r\n\r\n")
        reply = read_reply(sock)
    assert reply == b"" or 400 <= (status_of(reply) or 0) < 500, reply[:300]


@pytest.mark.parametrize("size", [100_000, 1_000_000, 8_000_000])
def test_oversize_headers_get_4xx_or_a_normal_answer_never_5xx_or_a_hang(echo_gateway: Probed, size: int) -> None:
    """The header limit is the server's (uvicorn's h11 refuses a head it has
    to buffer past 16 KiB, but a head that arrives in one read passes)."""
    with socket.create_connection(host_port(echo_gateway.url)) as sock:
        try:
            sock.sendall(b"GET /chat/stream?prompt=hi HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * size + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = read_reply(sock)
    assert reply == b"" or (status_of(reply) or 0) < 500, reply[:300]
    if size >= 1_000_000:
        assert reply == b"" or 400 <= (status_of(reply) or 0) < 500, reply[:300]


def test_random_bytes_get_4xx_or_a_closed_connection(echo_gateway: Probed) -> None:
    rng = random.Random(7)
    blobs = [rng.randbytes(rng.randrange(1, 4096)) for _ in range(40)]
    blobs += [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64),
        b"GET /\x00\xff HTTP/1.1\r\n\r\n",
        b"\r\n" * 100,
    ]
    for blob in blobs:
        with socket.create_connection(host_port(echo_gateway.url)) as sock:
            try:
                sock.sendall(blob)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass
            reply = read_reply(sock)
        assert reply == b"" or 400 <= (status_of(reply) or 0) < 500, (blob[:40], reply[:200])
    echo_gateway.nothing_left()


def test_a_storm_within_the_resume_grace_cancels_every_generation_once_the_grace_is_over(upstream: FakeUpstream) -> None:
    env = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": upstream.url + "/v1", "RESUME_GRACE_SECONDS": "0.5"}
    with serve_probed(env) as gw:
        left_at = asyncio.run(_storm(gw.url, 100))
        assert upstream.wait_for(lambda: upstream.open_connections == 0, 60)
        closed = [seen.closed_by_client - left_at for seen in upstream.seen if seen.closed_by_client is not None]
        assert len(closed) == 100 and min(closed) >= 0.4, min(closed)  # each generation outlived its client for the grace
        assert all(seen.closed_by_client is not None for seen in upstream.seen)
        gw.nothing_left()


# --- leaving, or cancelling, while the gateway waits to retry


def rate_limited(seen: object) -> Reply:
    """10 s: the longest backoff the gateway honours (MAX_RETRY_AFTER)."""
    return Reply(429, "application/json", [b'{"error": {"message": "slow down"}}'], headers={"retry-after": "10"})


def test_a_client_that_leaves_during_the_retry_backoff_stops_the_retries(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    with FakeUpstream(rate_limited) as upstream:
        with serve_probed({"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": upstream.url + "/v1", "USAGE_DB": str(db)}) as gw:
            with socket.create_connection(host_port(gw.url)) as sock:
                body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
                sock.sendall(post_head(len(body)) + body)
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
                assert upstream.wait_for(lambda: len(upstream.seen) == 1)
            left_at = time.monotonic()
            gw.nothing_left()  # the 10 s backoff sleep was cancelled at once...
            assert time.monotonic() - left_at < 8  # well before the 10 s Retry-After
            assert gw.attempts() == 1  # ...and no second attempt followed
    (row,) = usage_rows(db)
    assert (row["finish_reason"], row["client_disconnected"]) == ("cancelled", 1)


def test_delete_during_the_retry_backoff_ends_the_stream_as_cancelled_at_once() -> None:
    with FakeUpstream(rate_limited) as upstream:
        with serve_probed({"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": upstream.url + "/v1", "RESUME_GRACE_SECONDS": "30"}) as gw:
            with httpx.Client(base_url=gw.url, timeout=10) as client:
                with client.stream("GET", "/chat/stream", params={"prompt": "hi"}) as response:
                    assert upstream.wait_for(lambda: len(upstream.seen) == 1)
                    started = time.monotonic()
                    assert client.delete(f"/chat/stream/{response.headers['x-stream-id']}").status_code == 204
                    text = response.read().decode()
                assert time.monotonic() - started < 8  # well before the 10 s Retry-After
                assert text.rstrip().endswith("event: done\nid: " + response.headers["x-stream-id"] + ".1\ndata: cancelled")
                assert "event: error" not in text
            gw.nothing_left()
            assert gw.attempts() == 1


# --- the server shutting down under open streams


@pytest.mark.parametrize("disk", ["fast", "slow"])
def test_shutdown_under_open_streams_ends_each_with_an_error_and_loses_no_usage_row(
    upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk: str
) -> None:
    """uvicorn cancels the streams after its graceful timeout and runs the
    lifespan shutdown at once, without waiting for them; then asyncio.run
    cancels what is left, natively (anyio's shield does not hold against
    that). A slow disk widens the window in which rows could be lost."""
    slow_writes: list[int] = []
    if disk == "slow":  # the ledger's thread writes its rows in batches, through insert
        insert = ledger.SqliteStore.insert

        def slow_insert(self: ledger.SqliteStore, rows: list[list[object]]) -> None:
            time.sleep(0.2)
            slow_writes.append(len(rows))
            insert(self, rows)

        monkeypatch.setattr(ledger.SqliteStore, "insert", slow_insert)
    db = tmp_path / "usage.db"
    streams = 20
    env = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": upstream.url + "/v1", "USAGE_DB": str(db)}
    clients = [httpx.Client(timeout=10) for _ in range(streams)]
    try:
        with serve_probed(env) as gw:
            request = {"messages": [{"role": "user", "content": "x"}]}
            responses = [c.send(c.build_request("POST", gw.url + "/chat/stream", json=request), stream=True) for c in clients]
            readers = [r.iter_lines() for r in responses]
            for lines in readers:
                while next(lines) != "event: token":
                    pass
            stopping = time.monotonic()
        # uvicorn stopped: it waited its graceful timeout (2 s), then cancelled the streams
        assert time.monotonic() - stopping < 60  # it ended (generous: slow machines), it did not hang
        endings = ["\n".join(lines) for lines in readers]
    finally:
        for c in clients:
            c.close()
    for text in endings:
        assert '"type":"shutdown"' in text and text.rstrip().endswith("data: error"), text[-300:]
    assert upstream.wait_for(lambda: upstream.open_connections == 0)
    assert gw.gateway.start().ledger is not None and gw.gateway.start().ledger.closed  # closed last, after every row
    rows = usage_rows(db)
    assert len(rows) == streams
    assert {(row["finish_reason"], row["error_type"]) for row in rows} == {("error", "shutdown")}
    assert (sum(slow_writes) == streams) if disk == "slow" else not slow_writes  # the slow disk wrote every row


# --- a send that never completes, whatever it carries (in-process: the moment of the stall is chosen exactly)


@pytest.mark.anyio
@pytest.mark.parametrize("stall_on", ["token", "heartbeat", "after done"])
async def test_a_send_that_cannot_progress_ends_the_stream_within_the_send_timeout(stall_on: str) -> None:
    """The client stops reading just as a token, or a heartbeat, is sent, or
    once `done` went out (uvicorn waits for the buffer to drain at the start
    of the send *after* the one that filled it: here the closing empty chunk)."""
    import anyio


    env = {"USAGE_DB": "", "RESUME_GRACE_SECONDS": "0", "SEND_TIMEOUT_SECONDS": "0.3", "HEARTBEAT_SECONDS": "0.05"}
    env["ECHO_DELAY_SECONDS"] = "0" if stall_on == "after done" else "0.4"
    app = asgi_stream.Gateway(env)
    body = json.dumps({"messages": [{"role": "user", "content": "one two three four five"}]}).encode()
    pieces = [{"type": "http.request", "body": body, "more_body": False}]
    stalled, client_gone, returned = anyio.Event(), anyio.Event(), anyio.Event()
    done_went_out = False

    async def receive() -> dict[str, object]:
        if pieces:
            return pieces.pop(0)
        await client_gone.wait()
        return {"type": "http.disconnect"}

    def stalls(chunk: bytes) -> bool:
        if stall_on == "after done":
            return done_went_out
        return (b"event: token" if stall_on == "token" else b":\n") in chunk

    async def send(message: dict[str, object]) -> None:
        nonlocal done_went_out
        chunk = message.get("body", b"")
        assert isinstance(chunk, bytes)
        if stalled.is_set() or stalls(chunk):
            stalled.set()
            await client_gone.wait()  # the socket stays full until the client goes (as uvicorn's drain)
        done_went_out = done_went_out or b"event: done" in chunk

    async def serve_one() -> None:
        headers = [(b"content-type", b"application/json")]
        await app(
            {"type": "http", "method": "POST", "path": "/chat/stream", "query_string": b"", "headers": headers}, receive, send
        )
        returned.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve_one)
            await stalled.wait()
            started = anyio.current_time()
            with anyio.move_on_after(3):
                await returned.wait()
            ended_after = anyio.current_time() - started
            ended_by_itself = returned.is_set()
            client_gone.set()  # only now: the stall alone must end the stream
    assert ended_by_itself and ended_after < 0.3 + 1.2, f"the app was still sending {ended_after:.2f} s after the stall"
    assert app.metrics.active == 0


# --- more storms: over the stream limit, resumers, and clients that leave mid-body


async def _status_storm(url: str, clients: int) -> list[tuple[int, bytes]]:
    host, port = host_port(url)
    body = json.dumps({"messages": [{"role": "user", "content": "storm"}]}).encode()

    async def one() -> tuple[asyncio.StreamWriter, int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(post_head(len(body)) + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        if status == 200:
            await reader.readuntil(b"event: token")
        return writer, status, head

    answers = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(clients))), 30)
    for writer, _, _ in answers:
        writer.transport.abort()
    return [(status, head) for _, status, head in answers]


def test_a_storm_over_the_stream_limit_gets_503_for_the_excess_and_frees_every_slot(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "usage.db"
    env = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": upstream.url + "/v1", "USAGE_DB": str(db), "MAX_STREAMS": "40"}
    with serve_probed(env) as gw:
        answers = asyncio.run(_status_storm(gw.url, 120))
        statuses = [status for status, _ in answers]
        assert statuses.count(200) >= 40 and set(statuses) <= {200, 503}
        assert all(b"retry-after: 1" in head.lower() for status, head in answers if status == 503)
        gw.nothing_left(60)
        again = asyncio.run(_status_storm(gw.url, 40))  # every slot came back
        assert [status for status, _ in again] == [200] * 40
        gw.nothing_left(60)
    assert len(usage_rows(db)) == statuses.count(200) + 40  # one row per admitted stream, none for refusals


def test_a_resume_storm_then_everyone_leaving_cancels_the_generation_after_the_grace(upstream: FakeUpstream) -> None:
    env = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": upstream.url + "/v1", "RESUME_GRACE_SECONDS": "0.3"}
    with serve_probed(env) as gw:
        host, port = host_port(gw.url)

        async def storm() -> float:
            body = json.dumps({"messages": [{"role": "user", "content": "shared"}]}).encode()
            reader, first = await asyncio.open_connection(host, port)
            first.write(post_head(len(body)) + body)
            head = await reader.readuntil(b"\r\n\r\n")
            stream_id = next(line.split(b": ")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"x-stream-id"))
            await reader.readuntil(b"event: token")

            async def resume() -> asyncio.StreamWriter:
                r, w = await asyncio.open_connection(host, port)
                w.write(b"GET /chat/stream HTTP/1.1\r\nhost: x\r\nlast-event-id: %s.1\r\n\r\n" % stream_id)
                assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                await r.readuntil(b"event: token")
                return w

            writers = [first, *await asyncio.gather(*(resume() for _ in range(60)))]
            assert probe(gw.served).readers == 61
            leaving = time.monotonic()  # before the aborts: the grace starts after them, never before
            for writer in writers:
                writer.transport.abort()
            return leaving

        left_at = asyncio.run(storm())
        assert upstream.wait_for(lambda: upstream.open_connections == 0, 30)
        assert time.monotonic() - left_at >= 0.25  # the grace was honoured, then the upstream closed
        assert len(upstream.seen) == 1  # sixty resumes started no generation
        gw.nothing_left()


def test_clients_that_leave_in_the_middle_of_their_body_leave_nothing_behind(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    with serve_probed({"USAGE_DB": str(db)}) as gw:
        body = json.dumps({"messages": [{"role": "user", "content": "never mind"}]}).encode()
        for _ in range(50):
            with socket.create_connection(host_port(gw.url)) as sock:
                sock.sendall(post_head(len(body)) + body[: len(body) // 2])
        gw.nothing_left()
        assert gw.gateway.metrics.streams == {}
    assert usage_rows(db) == []  # no stream was admitted


def test_headers_over_the_apps_own_limit_get_431_whatever_the_server(echo_gateway: Probed) -> None:
    """Servers differ (h11 refuses a head it must buffer past 16 KiB, httptools
    has no limit), so the app enforces one of its own: 64 KiB in all."""
    big = [(f"x-big-{i}", "a" * 8000) for i in range(10)]
    reply = httpx.get(echo_gateway.url + "/chat/stream?prompt=hi", headers=big)
    assert reply.status_code == 431 and reply.json()["error"]["type"] == "invalid_request"
    assert "65536" in reply.json()["error"]["message"]
    assert httpx.get(echo_gateway.url + "/chat/stream?prompt=hi", headers=big[:7]).status_code == 200


def test_a_ledger_that_cannot_be_written_is_logged_and_streaming_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serve_probed({"USAGE_DB": str(tmp_path / "no-such-dir" / "usage.db")}) as gw:
        for _ in range(3):
            response = httpx.get(gw.url + "/chat/stream", params={"prompt": "still here"}, timeout=5)
            assert response.status_code == 200 and response.text.rstrip().endswith("data: stop")
        assert wait_until(lambda: "asgi_stream_ledger_rows_waiting 3" in httpx.get(gw.url + "/metrics").text)
        assert caplog.text.count("usage ledger write failed") == 1  # once per outage, not per row
        gw.nothing_left()
    assert "usage ledger: 3 rows could not be written" in caplog.text
