"""Stream lifecycle through real sockets: lossless resume, cancel, API keys,
limits, CORS, the usage ledger, metrics and the per-stream log line."""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import EventSource, ServerSentEvent

from tests.conftest import serve, stream
from tests.upstream import FakeUpstream, sse_tokens

WORDS = " ".join(f"w{i}" for i in range(60))
BODY = {"messages": [{"role": "user", "content": WORDS}]}


_READERS: weakref.WeakKeyDictionary[httpx.Response, Iterator[ServerSentEvent]] = weakref.WeakKeyDictionary()


def read_events(response: httpx.Response, limit: int | None = None) -> list[tuple[str, str, str]]:
    """The next `limit` events (all, if None); can be called again to go on."""
    reader = _READERS.setdefault(response, EventSource(response).iter_sse())
    events = []
    for sse in reader:
        events.append((sse.event, sse.data, sse.id))
        if limit is not None and len(events) >= limit:
            break
    return events


def tokens_of(events: list[tuple[str, str, str]]) -> str:
    return "".join(data for event, data, _ in events if event == "token")


Events = list[tuple[str, str, str]]


def resume_until_done(url: str, first_cut: int, rng: random.Random, headers: dict[str, str] | None = None) -> tuple[Events, int]:
    """Read a stream, cutting the connection at random points and resuming
    with the last id received, the way EventSource does; (events, connections)."""
    headers = headers or {}
    events: list[tuple[str, str, str]] = []
    connections = 1
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", url, json=BODY, headers=headers) as response:
            events += read_events(response, first_cut)
        while events[-1][0] != "done":
            connections += 1
            resume = {**headers, "Last-Event-ID": events[-1][2]}
            with client.stream("GET", url, headers=resume) as response:
                assert response.status_code == 200
                events += read_events(response, rng.randint(1, 8))
    return events, connections


def test_cut_connections_resume_losslessly_with_one_upstream_request() -> None:
    words = [f" word{i}" for i in range(80)]
    reply = sse_tokens(words, usage={"prompt_tokens": 3, "completion_tokens": 80, "total_tokens": 83}, pause=0.005)
    with FakeUpstream(lambda seen: reply) as upstream, serve({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": upstream.url,
                                                                 "RESUME_GRACE_SECONDS": "5"}) as gw:
        for seed in range(4):
            events, connections = resume_until_done(gw.url + "/chat/stream", 3 + seed, random.Random(seed))
            assert tokens_of(events) == "".join(words)
            assert connections > 3
            ids = [int(i.rsplit(".", 1)[1]) for _, _, i in events]
            assert ids == list(range(len(ids)))  # the opening `stream` event (0) once, then nothing missing, nothing twice
            assert [e for e, _, _ in events][-2:] == ["usage", "done"]
        assert len(upstream.seen) == 4  # one upstream request per stream, whatever the cuts


def test_resume_after_the_stream_finished_replays_the_rest() -> None:
    with serve({"RESUME_GRACE_SECONDS": "5"}) as gw:
        whole = stream("POST", gw.url + "/chat/stream", json=BODY)
        third_id = whole.events[2][2]
        rest = stream("GET", gw.url + "/chat/stream", headers={"Last-Event-ID": third_id})
        assert rest.events == whole.events[3:]
        assert rest.headers["x-stream-id"] == whole.headers["x-stream-id"]


def test_resume_from_the_opening_event_replays_everything_and_never_reopens() -> None:
    """A client that saw only the opening `stream` event (id <stream>.0)
    resumes from position 0; the resumed response sends no second opening,
    whose id would move the browser's Last-Event-ID back."""
    with serve({"RESUME_GRACE_SECONDS": "5"}) as gw:
        whole = stream("POST", gw.url + "/chat/stream", json=BODY)
        assert whole.opened is not None
        rest = stream("GET", gw.url + "/chat/stream", headers={"Last-Event-ID": whole.opened[1]})
        assert rest.status == 200 and rest.opened is None
        assert rest.events == whole.events and rest.text == WORDS


@pytest.mark.parametrize("last_id", ["nonsense", "", "abc.1", "{sid}.999", "{sid}.x", "{sid}", "{sid}.-1", "{sid}.{last}"])
def test_unresumable_ids_get_204_so_eventsource_stops(last_id: str) -> None:
    with serve({"RESUME_GRACE_SECONDS": "5"}) as gw:
        whole = stream("POST", gw.url + "/chat/stream", json=BODY)
        sid = whole.headers["x-stream-id"]
        header = last_id.format(sid=sid, last=len(whole.events))
        result = stream("GET", gw.url + "/chat/stream?prompt=x", headers={"Last-Event-ID": header})
        if header == "":  # an empty id is no resume request at all: a new stream starts
            assert result.status == 200 and result.text == "x"
        else:
            assert result.status == 204 and result.body == b""


def test_another_api_key_can_neither_resume_nor_cancel() -> None:
    env = {"API_KEYS": "alice:key-a,bob:key-b", "RESUME_GRACE_SECONDS": "5", "ECHO_DELAY_SECONDS": "0.05"}
    with serve(env) as gw, httpx.Client(timeout=10) as client:
        alice = {"Authorization": "Bearer key-a"}
        with client.stream("POST", gw.url + "/chat/stream", json=BODY, headers=alice) as response:
            first = read_events(response, 2)
            sid = response.headers["x-stream-id"]
            bob = {"Authorization": "Bearer key-b"}
            assert client.delete(f"{gw.url}/chat/stream/{sid}", headers=bob).status_code == 404
            resumed = client.get(gw.url + "/chat/stream", headers={**bob, "Last-Event-ID": first[-1][2]})
            assert resumed.status_code == 204
            assert client.delete(f"{gw.url}/chat/stream/{sid}", headers=alice).status_code == 204
            rest = read_events(response)
        assert rest[-1][:2] == ("done", "cancelled")


def test_delete_cancels_at_once_despite_the_resume_grace() -> None:
    slow = sse_tokens([f" t{i}" for i in range(400)], pause=0.02)
    env = {"OPENAI_API_KEY": "k", "RESUME_GRACE_SECONDS": "30"}
    with FakeUpstream(lambda seen: slow) as upstream, serve({**env, "OPENAI_BASE_URL": upstream.url}) as gw:
        with httpx.Client(timeout=10) as client, client.stream("POST", gw.url + "/chat/stream", json=BODY) as response:
            read_events(response, 4)  # the opening `stream` event and 3 tokens
            sid = response.headers["x-stream-id"]
            asked = time.monotonic()
            assert client.delete(f"{gw.url}/chat/stream/{sid}").status_code == 204
            rest = read_events(response)
            assert upstream.wait_for(lambda: upstream.seen[0].closed_by_client is not None, 30)
            assert upstream.seen[0].closed_by_client - asked < 3  # at once, not at the end of the reply
            assert rest[-1][:2] == ("done", "cancelled")
            assert client.delete(f"{gw.url}/chat/stream/{sid}").status_code == 404  # finished now
        assert gw.gateway.metrics.active == 0


def test_a_dropped_client_keeps_the_generation_for_the_grace_then_it_is_cancelled() -> None:
    slow = sse_tokens([f" t{i}" for i in range(2000)], pause=0.02)  # 40 s: far longer than the grace
    with FakeUpstream(lambda seen: slow) as upstream, serve({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": upstream.url,
                                                              "RESUME_GRACE_SECONDS": "0.6"}) as gw:
        with httpx.Client(timeout=10) as client, client.stream("POST", gw.url + "/chat/stream", json=BODY) as response:
            read_events(response, 2)
            dropped = time.monotonic()  # just before the close: the grace starts after it, never before
        assert upstream.wait_for(lambda: upstream.seen[0].closed_by_client is not None, 30)
        waited = upstream.seen[0].closed_by_client - dropped
        assert 0.5 < waited < 15  # the 0.6 s grace, then cancelled: not the 40 s the reply lasts


def test_api_keys_are_required_when_configured() -> None:
    with serve({"API_KEYS": "alice:key-a"}) as gw:
        assert stream("POST", gw.url + "/chat/stream", json=BODY).status == 401
        wrong = stream("POST", gw.url + "/chat/stream", json=BODY, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401 and json.loads(wrong.body)["error"]["type"] == "unauthorized"
        ok = stream("POST", gw.url + "/chat/stream", json=BODY, headers={"Authorization": "Bearer key-a"})
        assert ok.status == 200 and ok.text == WORDS
        assert stream("GET", gw.url + "/chat/stream?prompt=hi&access_token=key-a").text == "hi"
        assert httpx.get(gw.url + "/healthz").status_code == 200
        assert httpx.get(gw.url + "/metrics").status_code == 401
        assert httpx.get(gw.url + "/metrics", headers={"Authorization": "Bearer key-a"}).status_code == 200


def test_stream_limits_answer_503_and_429_with_retry_after_and_free_the_slot_at_done() -> None:
    reply = sse_tokens(["a", "b"], pause=3)  # the first streams stay open while the others are refused, even on a slow machine
    env = {"OPENAI_API_KEY": "k", "MAX_STREAMS": "2", "MAX_STREAMS_PER_KEY": "1", "API_KEYS": "a:key-a,b:key-b"}
    with FakeUpstream(lambda seen: reply) as upstream, serve({**env, "OPENAI_BASE_URL": upstream.url}) as gw, \
            httpx.Client(timeout=10) as client:
        a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
        with client.stream("POST", gw.url + "/chat/stream", json=BODY, headers=a) as first:
            read_events(first, 2)  # the opening `stream` event and a token: its upstream request is made
            second_a = client.post(gw.url + "/chat/stream", json=BODY, headers=a)
            assert second_a.status_code == 429 and second_a.headers["retry-after"]
            with client.stream("POST", gw.url + "/chat/stream", json=BODY, headers=b) as second:
                read_events(second, 2)
                third = client.post(gw.url + "/chat/stream", json=BODY, headers=b)
                assert third.status_code == 503 and third.headers["retry-after"]
                assert json.loads(third.content)["error"]["type"] == "overloaded"
                assert len(upstream.seen) == 2  # refused requests cost no upstream call
                read_events(second)
            events = read_events(first)
            assert events[-1][:2] == ("done", "stop")
            # the slot is free the moment done was written
            again = client.post(gw.url + "/chat/stream", json=BODY, headers=a)
            assert again.status_code == 200


def test_cors_preflight_and_headers_for_listed_origins_only() -> None:
    with serve({"CORS_ORIGINS": "https://app.example"}) as gw:
        good = httpx.options(gw.url + "/chat/stream", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert good.status_code == 204
        assert good.headers["access-control-allow-origin"] == "https://app.example"
        assert "DELETE" in good.headers["access-control-allow-methods"]
        assert "Last-Event-ID" in good.headers["access-control-allow-headers"]
        assert good.headers["vary"] == "Origin"
        bad = httpx.options(gw.url + "/chat/stream", headers={"Origin": "https://evil.example"})
        assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers
        streamed = stream("GET", gw.url + "/chat/stream?prompt=hi", headers={"Origin": "https://app.example"})
        assert streamed.headers["access-control-allow-origin"] == "https://app.example"
        foreign = stream("GET", gw.url + "/chat/stream?prompt=hi", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in foreign.headers


def test_every_ending_writes_one_ledger_row_that_survives_a_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "usage.db"
    slow = sse_tokens([f" t{i}" for i in range(300)], pause=0.02)
    replies = iter([sse_tokens(["Hi", "!"], usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}),
                    slow, sse_tokens(["x"], finish="length")])
    caplog.set_level(logging.INFO, logger="asgi_stream")
    env = {"OPENAI_API_KEY": "sk-SECRET", "USAGE_DB": str(db), "API_KEYS": "alice:key-a"}
    with FakeUpstream(lambda seen: next(replies)) as upstream, serve({**env, "OPENAI_BASE_URL": upstream.url}) as gw, \
            httpx.Client(timeout=10, headers={"Authorization": "Bearer key-a"}) as client:
        ok = stream("POST", gw.url + "/chat/stream", json=BODY, headers={"Authorization": "Bearer key-a"})
        with client.stream("POST", gw.url + "/chat/stream", json=BODY) as response:
            read_events(response, 4)  # the opening `stream` event and 3 tokens
        assert upstream.wait_for(lambda: gw.gateway.metrics.active == 0, 30)
        no_usage = stream("POST", gw.url + "/chat/stream", json=BODY, headers={"Authorization": "Bearer key-a"})
        echo = stream("GET", gw.url + "/chat/stream?backend=echo&prompt=one+two&access_token=key-a")
    rows = {r["stream_id"]: r for r in map(dict, _rows(db))}
    assert len(rows) == 4
    first = rows[ok.headers["x-stream-id"]]
    assert (first["key_name"], first["backend"], first["finish_reason"], first["total_tokens"], first["estimated"]) == \
        ("alice", "openai", "stop", 7, 0)
    gone = [r for r in rows.values() if r["client_disconnected"]]
    assert len(gone) == 1 and gone[0]["finish_reason"] == "cancelled" and gone[0]["estimated"] == 1
    assert gone[0]["completion_tokens"] >= 3
    estimated = rows[no_usage.headers["x-stream-id"]]
    assert (estimated["finish_reason"], estimated["completion_tokens"], estimated["estimated"]) == ("length", 1, 1)
    assert rows[echo.headers["x-stream-id"]]["backend"] == "echo"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "asgi_stream" and "stream_end" in r.getMessage()]
    assert {line["stream_id"] for line in lines} == set(rows)
    text = caplog.text
    assert "sk-SECRET" not in text and "key-a" not in text and "w59" not in text  # no keys, no prompt text
    summary = subprocess.run([sys.executable, "-m", "asgi_stream", "usage"], capture_output=True, text=True,
                             env={"USAGE_DB": str(db), "PATH": "/usr/bin:/bin"}, cwd=Path(__file__).parent.parent, check=True)
    assert "alice" in summary.stdout and "openai" in summary.stdout and "echo" in summary.stdout


def _rows(db: Path) -> list[sqlite3.Row]:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    try:
        return connection.execute("SELECT * FROM usage").fetchall()
    finally:
        connection.close()


def test_metrics_count_streams_tokens_errors_and_latencies() -> None:
    with serve() as gw:
        stream("POST", gw.url + "/chat/stream", json=BODY)
        stream("GET", gw.url + "/chat/stream?prompt=a+b+c")
        stream("POST", gw.url + "/chat/stream", content=b"{", headers={"content-type": "application/json"})
        text = httpx.get(gw.url + "/metrics").text
    assert 'asgi_stream_streams_total{backend="echo",finish_reason="stop"} 2' in text
    assert 'asgi_stream_tokens_total{backend="echo"} 63' in text
    assert 'asgi_stream_rejected_total{type="invalid_request"} 1' in text
    assert "asgi_stream_active_streams 0" in text
    assert 'asgi_stream_time_to_first_token_seconds_bucket{le="+Inf"} 2' in text
    assert "asgi_stream_duration_seconds_count 2" in text


def test_a_stream_open_at_shutdown_ends_with_a_shutdown_error_and_its_ledger_row(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    slow = sse_tokens([f" t{i}" for i in range(1000)], pause=0.02)
    with FakeUpstream(lambda seen: slow) as upstream:
        with serve({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": upstream.url, "USAGE_DB": str(db)}) as gw, \
                httpx.Client(timeout=10) as client, client.stream("POST", gw.url + "/chat/stream", json=BODY) as response:
            read_events(response, 2)
            threading.Timer(0.1, lambda: setattr(gw.server, "should_exit", True)).start()
            rest = read_events(response)  # uvicorn cancels the stream after its graceful timeout
        assert rest[-2][0] == "error" and json.loads(rest[-2][1])["type"] == "shutdown"
        assert rest[-1][:2] == ("done", "error")
        assert upstream.wait_for(lambda: upstream.seen[0].closed_by_client is not None, 30)
    (row,) = _rows(db)
    assert (row["finish_reason"], row["error_type"]) == ("error", "shutdown")
