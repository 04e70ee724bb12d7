"""Upstream faults, injected by a fake OpenAI upstream on 127.0.0.1: every way
an upstream can fail ends the client's stream with `error` (of the right
type) then `done: error` within its deadline, lets go of the upstream
connection, writes the usage row, and leaves the gateway serving."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from asgi_stream_core import upstream_client
from tests.conftest import free_port, stream
from tests.faultkit import assert_no_secret, serve_probed, usage_rows
from tests.upstream import FakeUpstream, Reply, Seen, sse_tokens

KEY = "sk-fault-SECRET-7f3a9c"
OK_PROMPT = "all is well"
FAULT_PROMPT = "break something"


def chunk(token: str) -> bytes:
    return (
        b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]}).encode() + b"\n\n"
    )


def error_body(message: str) -> list[bytes | float]:
    return [json.dumps({"error": {"message": message, "type": "some_error"}}).encode()]


@dataclass
class Fault:
    """One injected fault and the ending it must have."""

    reply: Callable[[], Reply] | None  # None: the address is not the fake (see `address`)
    error_type: str
    message: str  # a fragment of the error message
    attempts: int = 1  # upstream requests sent, retries included
    env: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    tokens: int = 0  # tokens sent before the failure (-1: some)
    within: float = 3.0  # seconds from the request to `done`
    not_before: float = 0.0  # a deadline must not fire early
    hangup: bool = True  # the gateway closes the broken upstream connection (else: returned whole to the pool)
    address: str = "fake"  # fake | refused | unaccepted
    retry_after: float | None = None


SIXTEEN_MIB_LINE: list[bytes | float] = [b"data: ", *([b"x" * 65536] * 256)]

FAULTS: dict[str, Fault] = {
    "connection refused": Fault(None, "upstream_unavailable", "cannot connect", attempts=3, address="refused", hangup=False),
    "connect timeout (accept queue full)": Fault(
        None,
        "timeout",
        "connect timeout",
        attempts=3,
        address="unaccepted",
        hangup=False,
        env={"CONNECT_TIMEOUT_SECONDS": "0.2"},
        not_before=0.6,
        within=3.0,
    ),
    "accepts but never answers": Fault(  # until the first token only its deadline applies, not the idle one
        lambda: Reply(delay_headers=3600),
        "timeout",
        "first-token deadline",
        env={"IDLE_TIMEOUT_SECONDS": "0.2", "FIRST_TOKEN_TIMEOUT_SECONDS": "0.6"},
        not_before=0.6,
        within=2.5,
    ),
    "headers then silence": Fault(
        lambda: Reply(end="hang"),
        "timeout",
        "first-token deadline",
        env={"FIRST_TOKEN_TIMEOUT_SECONDS": "0.5"},
        not_before=0.5,
        within=2,
    ),
    "tokens then silence": Fault(
        lambda: Reply(pieces=[chunk("Hel"), chunk("lo")], end="hang"),
        "timeout",
        "idle deadline",
        tokens=2,
        env={"IDLE_TIMEOUT_SECONDS": "0.4"},
        not_before=0.4,
        within=2,
    ),
    "a stream that never ends": Fault(
        lambda: Reply(repeat=[chunk(" more"), 0.02]),
        "timeout",
        "total deadline",
        tokens=-1,
        env={"TOTAL_TIMEOUT_SECONDS": "1"},
        not_before=1,
        within=3,
    ),
    "keep-alive comments and no tokens": Fault(
        lambda: Reply(repeat=[b": keep-alive\n\n", 0.01]),
        "timeout",
        "first-token deadline",
        env={"FIRST_TOKEN_TIMEOUT_SECONDS": "0.8", "IDLE_TIMEOUT_SECONDS": "0.3"},
        not_before=0.8,
        within=2.5,
    ),
    "closed mid-line after a token": Fault(
        lambda: Reply(pieces=[chunk("Hi"), b'data: {"choi'], end="close"), "protocol_error", "the upstream stream broke", tokens=1
    ),
    "closed mid-line before any token": Fault(
        lambda: Reply(pieces=[b'data: {"choi'], end="close"), "protocol_error", "the upstream stream broke"
    ),
    "reset mid-line": Fault(
        lambda: Reply(pieces=[chunk("Hi"), b'data: {"choi'], end="reset"), "protocol_error", "the upstream stream broke", tokens=1
    ),
    "closed cleanly without a finish reason": Fault(
        lambda: Reply(pieces=[chunk("Hi")]), "protocol_error", "without a finish reason", tokens=1, hangup=False
    ),
    "HTTP 401": Fault(
        lambda: Reply(401, "application/json", error_body("bad key")), "upstream_error", "bad key", status=401, hangup=False
    ),
    "HTTP 404": Fault(
        lambda: Reply(404, "application/json", error_body("no such model")),
        "upstream_error",
        "no such model",
        status=404,
        hangup=False,
    ),
    "HTTP 429 with Retry-After": Fault(
        lambda: Reply(429, "application/json", error_body("slow down"), headers={"retry-after": "0.05"}),
        "upstream_error",
        "slow down",
        attempts=3,
        status=429,
        hangup=False,
        retry_after=0.05,
        not_before=0.1,
    ),
    "HTTP 429 asking for a wait past the first-token deadline": Fault(
        lambda: Reply(429, "application/json", error_body("come back in an hour"), headers={"retry-after": "3600"}),
        "upstream_error",
        "come back in an hour",
        status=429,
        hangup=False,
        retry_after=3600.0,
        # the pause (Retry-After capped at 10 s) would pass the deadline, so no retry; a deadline of 8 s, above
        # within + SLACK, tells "reported at once" from "waited for the deadline" even on a slow machine
        env={"FIRST_TOKEN_TIMEOUT_SECONDS": "8"},
        within=0.9,  # no pointless wait: the upstream's answer is reported at once
    ),
    "HTTP 500": Fault(
        lambda: Reply(500, "application/json", error_body("internal"), headers={"retry-after": "0"}),
        "upstream_error",
        "internal",
        attempts=3,
        status=500,
        hangup=False,
        retry_after=0.0,
    ),
    "HTTP 502 with an HTML body": Fault(
        lambda: Reply(502, "text/html", [b"<html><body><h1>502 Bad Gateway</h1></body></html>"]),
        "upstream_error",
        "upstream answered HTTP 502: <html>",
        attempts=3,
        status=502,
        hangup=False,
    ),
    "HTTP 503": Fault(
        lambda: Reply(503, "application/json", error_body("overloaded"), headers={"retry-after-ms": "20"}),
        "upstream_error",
        "overloaded",
        attempts=3,
        status=503,
        hangup=False,
        retry_after=0.02,
        not_before=0.04,
    ),
    "a data line that is not JSON": Fault(
        lambda: Reply(pieces=[chunk("Hi"), b"data: hello there\n\n"], end="hang"), "protocol_error", "not JSON", tokens=1
    ),
    "JSON that is not an object": Fault(
        lambda: Reply(pieces=[b"data: [1, 2, 3]\n\n"], end="hang"), "protocol_error", "not a chunk object"
    ),
    "a choice that is not an object": Fault(
        lambda: Reply(pieces=[b'data: {"choices": ["x"]}\n\n'], end="hang"), "protocol_error", "choice that is not an object"
    ),
    "bytes that are not UTF-8": Fault(
        lambda: Reply(pieces=[chunk("Hi"), b'data: {"choices": [{"delta": {"content": "\xff\xfe"}}]}\n\n'], end="hang"),
        "protocol_error",
        "not JSON",
        tokens=1,
    ),
    "one line of 16 MiB with no end": Fault(
        lambda: Reply(pieces=SIXTEEN_MIB_LINE, end="hang"), "protocol_error", "exceeded", within=5
    ),
    "200 with a JSON body instead of a stream": Fault(
        lambda: Reply(200, "application/json", [b'{"choices": [{"message": {"content": "Hi"}, "finish_reason": "stop"}]}']),
        "protocol_error",
        "without a finish reason",
        hangup=False,
    ),
    "200 with an HTML page": Fault(
        lambda: Reply(200, "text/html", [b"<html><body>Please log in to the Wi-Fi</body></html>"]),
        "protocol_error",
        "without a finish reason",
        hangup=False,
    ),
    "a redirect": Fault(
        lambda: Reply(302, "text/html", [b"moved"], headers={"location": "http://127.0.0.1:1/elsewhere"}),
        "upstream_error",
        "upstream answered HTTP 302",
        status=302,
        hangup=False,
    ),
    "a body that is not the gzip it claims": Fault(
        lambda: Reply(pieces=[b"\x1f\x8b\x08\x00garbage" * 10], headers={"content-encoding": "gzip"}, end="hang"),
        "protocol_error",
        "the upstream stream broke",
    ),
    "response headers of 1 MiB": Fault(
        lambda: Reply(headers={"x-huge": "a" * (1 << 20)}, pieces=[chunk("Hi")], end="hang"),
        "protocol_error",
        "broke the connection before answering",
        attempts=3,
    ),
    "an answer that is not HTTP": Fault(
        lambda: Reply(raw=b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), "protocol_error", "illegal status line", attempts=3
    ),
    "closes the connection without answering": Fault(
        lambda: Reply(raw=b""), "protocol_error", "Server disconnected without sending a response", attempts=3
    ),
    "an in-band error event after a token": Fault(
        lambda: Reply(
            pieces=[chunk("Hi"), b'data: {"error": {"message": "model overloaded", "type": "server_error"}}\n\n'], end="hang"
        ),
        "upstream_error",
        "model overloaded",
        tokens=1,
    ),
}

SLACK = 5.0  # seconds of scheduling noise: CI may run 5x slower than a loaded 2-core machine (coverage traces every thread)
BASE = {
    "CONNECT_TIMEOUT_SECONDS": "1",
    "FIRST_TOKEN_TIMEOUT_SECONDS": "3",
    "IDLE_TIMEOUT_SECONDS": "2",
    "TOTAL_TIMEOUT_SECONDS": "6",
}


def normal_reply() -> Reply:
    return sse_tokens(["still", " serving"], usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})


@contextmanager
def unaccepted_address() -> Iterator[str]:
    """A port that listens but whose accept queue is full: SYNs go unanswered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # the kernel queues backlog + 1; the rest are left hanging
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                fillers.append(s)
            time.sleep(0.05)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            for s in fillers:
                s.close()


def fault_responder(fault: Fault) -> Callable[[Seen], Reply]:
    """The fault's reply to the faulty request; a normal stream to the check that serving goes on."""

    def responder(seen: Seen) -> Reply:
        if OK_PROMPT.encode() in seen.body or fault.reply is None:
            return normal_reply()
        return fault.reply()

    return responder


@pytest.mark.parametrize("name", FAULTS)
def test_upstream_fault_ends_the_stream_with_an_error_and_leaves_nothing_behind(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fault = FAULTS[name]
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "usage.db"

    with FakeUpstream(fault_responder(fault)) as upstream, _base_url(fault, upstream) as base_url:
        env = {**BASE, **fault.env, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": base_url, "USAGE_DB": str(db)}
        with serve_probed(env) as gw:
            started = time.monotonic()
            result = stream("POST", gw.url + "/chat/stream", json={"messages": [{"role": "user", "content": FAULT_PROMPT}]})
            elapsed = time.monotonic() - started

            assert result.status == 200
            assert result.names[-2:] == ["error", "done"] and result.of("done") == ["error"]
            assert result.names.count("error") == 1 and result.names.count("done") == 1
            error = json.loads(result.of("error")[0])
            assert error["type"] == fault.error_type, error
            assert fault.message in error["message"], error
            assert error.get("status") == fault.status
            assert error.get("retry_after") == fault.retry_after
            tokens = len(result.of("token"))
            assert tokens >= 1 if fault.tokens == -1 else tokens == fault.tokens
            if tokens:  # whatever the ending, the usage is known (estimated here)
                assert result.names[-3] == "usage" and json.loads(result.of("usage")[0])["completion_tokens"] == tokens
            assert fault.not_before <= elapsed < fault.within + SLACK, f"done after {elapsed:.2f} s"
            assert gw.attempts() == fault.attempts
            if fault.hangup:
                assert upstream.wait_for(lambda: upstream.open_connections == 0, 30), "the upstream connection stayed open"
            fault_stream = result.headers["x-stream-id"]
            gw.nothing_left()

            ok_body: dict[str, Any] = {"messages": [{"role": "user", "content": OK_PROMPT}]}
            if fault.address != "fake":
                ok_body["backend"] = "echo"
            ok = stream("POST", gw.url + "/chat/stream", json=ok_body)
            assert ok.status == 200 and ok.of("done") == ["stop"] and "error" not in ok.names
            gw.nothing_left()

    rows = {row["stream_id"]: row for row in usage_rows(db)}
    assert len(rows) == 2
    row = rows[fault_stream]
    assert (row["finish_reason"], row["error_type"], row["completion_tokens"]) == ("error", fault.error_type, tokens)
    assert_no_secret(caplog.text, KEY)
    assert_no_secret(json.dumps(result.events), KEY)


@contextmanager
def _base_url(fault: Fault, upstream: FakeUpstream) -> Iterator[str]:
    if fault.address == "refused":
        yield f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    elif fault.address == "unaccepted":
        with unaccepted_address() as url:
            yield url
    else:
        yield upstream.url + "/v1"


def test_an_upstream_error_that_echoes_the_provider_key_comes_out_redacted(caplog: pytest.LogCaptureFixture) -> None:
    """401 JSON, 502 HTML, a 403 with the key in its type and code, and an in-band error event, each quoting the key back."""
    caplog.set_level(logging.DEBUG)
    echoing = {
        "401": Reply(401, "application/json", error_body(f"Incorrect API key provided: {KEY}.")),
        "502": Reply(
            502, "text/html", [f"<html>proxy: upstream refused Bearer {KEY}</html>".encode()], headers={"retry-after": "0"}
        ),
        "fields": Reply(
            403, "application/json", [json.dumps({"error": {"message": "no", "type": f"bad_key_{KEY}", "code": KEY}}).encode()]
        ),
        "in-band": Reply(
            pieces=[chunk("Hi"), f'data: {{"error": {{"message": "key {KEY} has no quota"}}}}\n\n'.encode()], end="hang"
        ),
    }
    with FakeUpstream(lambda seen: echoing[seen.json["messages"][0]["content"]]) as upstream:
        with serve_probed({**BASE, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": upstream.url + "/v1"}) as gw:
            for prompt, status in [("401", 401), ("502", 502), ("fields", 403), ("in-band", None)]:
                result = stream("POST", gw.url + "/chat/stream", json={"messages": [{"role": "user", "content": prompt}]})
                error = json.loads(result.of("error")[0])
                assert error["type"] == "upstream_error" and error.get("status") == status
                assert "[redacted]" in json.dumps(error)
                assert_no_secret(json.dumps(result.events), KEY)
            gw.nothing_left()
    assert_no_secret(caplog.text, KEY)


def test_a_kept_alive_connection_the_upstream_drops_as_it_is_reused_is_retried_on_a_fresh_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keep-alive race: the upstream closes an idle connection just as the
    gateway sends the next request on it ("Server disconnected without
    sending a response"). Nothing was answered, so a retry is safe. (One
    pool, so that consecutive requests reuse one connection.)"""
    monkeypatch.setattr(upstream_client, "UPSTREAM_POOLS", 1)

    def responder(seen: Seen) -> Reply:
        return normal_reply() if seen.exchange == 1 else Reply(raw=b"")

    with (
        FakeUpstream(responder) as upstream,
        serve_probed({**BASE, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": upstream.url + "/v1"}) as gw,
    ):
        for _ in range(3):
            result = stream("POST", gw.url + "/chat/stream", json={"messages": [{"role": "user", "content": "again"}]})
            assert result.text == "still serving" and result.of("done") == ["stop"], result.events
        assert [seen.exchange for seen in upstream.seen] == [1, 2, 1, 2, 1]
        assert gw.attempts() == 5
        gw.nothing_left()
