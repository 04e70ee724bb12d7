"""Heartbeats and the send timeout, which the writer no longer times itself
(one watcher per reader keeps time, so no timer is armed per token)."""

from __future__ import annotations

import socket
import time

import httpx
import orjson

from tests.conftest import serve


def test_a_silent_stream_gets_comment_heartbeats_between_its_events() -> None:
    env = {"ECHO_DELAY_SECONDS": "0.25", "HEARTBEAT_SECONDS": "0.05"}
    with serve(env) as served, httpx.Client(timeout=10) as client:
        body = {"messages": [{"role": "user", "content": "one two"}]}
        with client.stream("POST", served.url + "/chat/stream", json=body) as response:
            raw = b"".join(response.iter_raw())
    head, _, rest = raw.partition(b"event: token")
    assert b":\n" in head  # silent before the first token
    assert b":\n" in rest.partition(b"event: done")[0]  # and between tokens
    assert raw.count(b"event: token") == 2 and raw.endswith(b"data: stop\n\n")


def test_a_busy_stream_sends_no_heartbeats() -> None:
    # 400 tokens 0.01 s apart outlast the 1 s heartbeat several times over; a slow
    # machine may stall a token for a few tens of milliseconds, not for a second
    with serve({"ECHO_DELAY_SECONDS": "0.01", "HEARTBEAT_SECONDS": "1"}) as served:
        with httpx.Client(timeout=60) as client:
            body = {"messages": [{"role": "user", "content": "w " * 400}]}
            with client.stream("POST", served.url + "/chat/stream", json=body) as response:
                raw = b"".join(response.iter_raw())
    assert raw.count(b"event: token") == 400 and b":\n" not in raw


def test_a_client_that_takes_no_bytes_is_dropped_after_the_send_timeout() -> None:
    env = {"SEND_TIMEOUT_SECONDS": "0.3", "STREAM_BUFFER_BYTES": str(64 << 20), "MAX_TOKENS_LIMIT": "200000"}
    with serve(env) as served, socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(served.url.rsplit(":", 1)[1])))
        body = orjson.dumps({"messages": [{"role": "user", "content": "word " * 100_000}], "max_tokens": 200_000})
        sock.sendall(b"POST /chat/stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 120  # generous: a slow machine generates 100,000 tokens in about a minute
        while not served.gateway.metrics.streams:  # the generation ends long before the client reads
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (record,) = served.gateway.start().registry._streams.values()
        stuck_since = time.monotonic()
        while record.readers:  # the writer is stuck in a send the client never takes
            assert time.monotonic() < deadline, "the reader was never dropped"
            time.sleep(0.01)
        assert time.monotonic() - stuck_since < 30  # dropped by the 0.3 s send timeout, not by the test giving up


def test_the_echo_backend_is_paced_for_people_by_default() -> None:
    """A fresh server's echo reply streams word by word, visibly: with the
    default pacing, five words take at least four pauses of 0.05 s."""
    with serve({"ECHO_DELAY_SECONDS": ""}) as served, httpx.Client(timeout=20) as client:  # empty: the default
        body = {"messages": [{"role": "user", "content": "one two three four five"}]}
        with client.stream("POST", served.url + "/chat/stream", json=body) as response:
            arrivals = [time.monotonic() for piece in response.iter_raw() if b"event: token" in piece]
    assert len(arrivals) >= 2  # not the whole reply in one write
    assert arrivals[-1] - arrivals[0] >= 4 * 0.05 * 0.9
