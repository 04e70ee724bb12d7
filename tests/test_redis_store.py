"""The Redis store over real sockets: two gateways (uvicorn in threads) on one
real redis-server are one service: resume, cancel, grace and limits across
them, a dead owner's streams interrupted, and a Redis outage answered."""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import serve, stream
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - a fixture
from tests.test_lifecycle import BODY, read_events, tokens_of
from tests.upstream import FakeUpstream, sse_tokens

WORDS = [f" word{i}" for i in range(80)]


def test_a_stream_cut_on_one_replica_resumes_losslessly_on_the_other(redis_server: RedisServer) -> None:
    reply = sse_tokens(WORDS, usage={"prompt_tokens": 3, "completion_tokens": 80, "total_tokens": 83}, pause=0.005)
    env = {"REDIS_URL": redis_server.url, "RESUME_GRACE_SECONDS": "5", "OPENAI_API_KEY": "k"}
    with FakeUpstream(lambda seen: reply) as upstream, serve({**env, "OPENAI_BASE_URL": upstream.url}) as one, \
            serve({**env, "OPENAI_BASE_URL": upstream.url}) as two, httpx.Client(timeout=10) as client:
        rng = random.Random(1)
        events: list[tuple[str, str, str]] = []
        with client.stream("POST", one.url + "/chat/stream", json=BODY) as response:
            events += read_events(response, 3)
        connections = 1
        while events[-1][0] != "done":
            replica = (one, two)[connections % 2]
            connections += 1
            with client.stream("GET", replica.url + "/chat/stream", headers={"Last-Event-ID": events[-1][2]}) as response:
                assert response.status_code == 200, response.read()
                events += read_events(response, rng.randint(1, 8))
        assert tokens_of(events) == "".join(WORDS)
        ids = [int(i.rsplit(".", 1)[1]) for _, _, i in events]
        assert ids == list(range(len(ids)))  # the opening `stream` event is position 0, once
        assert [e for e, _, _ in events][-2:] == ["usage", "done"]
        assert len(upstream.seen) == 1 and connections > 4
        finished = stream("GET", two.url + "/chat/stream", headers={"Last-Event-ID": events[-1][2]})
        assert finished.status == 204
        replay = stream("GET", two.url + "/chat/stream", headers={"Last-Event-ID": events[2][2]})
        assert replay.events == events[3:]


def slow_reply(seen: object) -> bytes:
    return sse_tokens([f" t{i}" for i in range(400)], pause=0.02)


def two_replicas_env(redis_server: RedisServer, upstream: FakeUpstream, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redis_server.url, "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": upstream.url, **extra}


def test_delete_on_another_replica_cancels_the_owners_upstream_at_once(redis_server: RedisServer) -> None:
    with FakeUpstream(slow_reply) as upstream:
        env = two_replicas_env(redis_server, upstream, RESUME_GRACE_SECONDS="30")
        with serve(env) as one, serve(env) as two, httpx.Client(timeout=10) as client, \
                client.stream("POST", one.url + "/chat/stream", json=BODY) as response:
            read_events(response, 3)
            sid = response.headers["x-stream-id"]
            asked = time.monotonic()
            assert client.delete(f"{two.url}/chat/stream/{sid}").status_code == 204
            assert upstream.wait_for(lambda: upstream.seen[0].closed_by_client is not None, 5)
            latency = upstream.seen[0].closed_by_client - asked
            print(f"cross-replica cancel: DELETE sent -> upstream closed in {latency * 1000:.1f} ms")
            assert latency < 2
            assert read_events(response)[-1][:2] == ("done", "cancelled")
            assert upstream.wait_for(lambda: b"finished" in redis_server.command("HGETALL", f"asgi-stream:{sid}:meta"), 5)
            assert client.delete(f"{two.url}/chat/stream/{sid}").status_code == 404  # finished now
            assert client.delete(f"{two.url}/chat/stream/nonsense").status_code == 404


def test_the_resume_grace_counts_readers_on_every_replica(redis_server: RedisServer) -> None:
    with FakeUpstream(slow_reply) as upstream:
        env = two_replicas_env(redis_server, upstream, RESUME_GRACE_SECONDS="0.6")
        with serve(env) as one, serve(env) as two, httpx.Client(timeout=10) as client:
            with client.stream("POST", one.url + "/chat/stream", json=BODY) as response:
                last = read_events(response, 2)[-1][2]
                with client.stream("GET", two.url + "/chat/stream", headers={"Last-Event-ID": last}) as follower:
                    read_events(follower, 2)
                    response.close()  # the owner's own reader leaves; the one on the other replica stays
                    time.sleep(2)
                    assert upstream.seen[0].closed_by_client is None
                    read_events(follower, 5)
                left = time.monotonic()
            assert upstream.wait_for(lambda: upstream.seen[0].closed_by_client is not None, 10)
            assert upstream.seen[0].closed_by_client - left > 0.5  # the grace, counted from the last reader anywhere


def test_stream_limits_are_exact_across_replicas_under_a_burst(redis_server: RedisServer) -> None:
    env = {"REDIS_URL": redis_server.url, "MAX_STREAMS": "5", "ECHO_DELAY_SECONDS": "0.05", "RESUME_GRACE_SECONDS": "5"}
    with serve(env) as one, serve(env) as two, serve(env) as three:
        replicas = [one, two, three] * 6
        statuses: list[tuple[int, str]] = []
        barrier = threading.Barrier(len(replicas))
        hold = threading.Event()

        def start(url: str) -> None:
            with httpx.Client(timeout=20) as client:
                barrier.wait()
                with client.stream("POST", url + "/chat/stream", json=BODY) as response:
                    statuses.append((response.status_code, "" if response.status_code == 200 else response.read().decode()))
                    hold.wait(20)

        threads = [threading.Thread(target=start, args=(r.url,)) for r in replicas]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while len(statuses) < len(replicas) and time.monotonic() < deadline:
            time.sleep(0.05)
        hold.set()
        for thread in threads:
            thread.join(20)
        assert sorted(s for s, _ in statuses) == [200] * 5 + [503] * 13
        assert all('"overloaded"' in body for s, body in statuses if s == 503)
    # the slots came free at done: nothing left held
    assert redis_server.command("ZCARD", "asgi-stream:slots").startswith(b":0")


def test_an_owner_that_stops_renewing_its_lease_is_interrupted_once_and_written_to_the_ledger(
        redis_server: RedisServer, tmp_path: Path) -> None:
    with FakeUpstream(slow_reply) as upstream:
        env = two_replicas_env(redis_server, upstream, RESUME_GRACE_SECONDS="30", OWNER_LEASE_SECONDS="1")
        with serve({**env, "USAGE_DB": str(tmp_path / "one.db")}) as one, serve({**env, "USAGE_DB": str(tmp_path / "two.db")}) as two, \
                httpx.Client(timeout=20) as client:
            with client.stream("POST", one.url + "/chat/stream", json=BODY) as response:
                last = read_events(response, 3)[-1][2]
                sid = response.headers["x-stream-id"]
            with client.stream("GET", two.url + "/chat/stream", headers={"Last-Event-ID": last}) as follower:
                read_events(follower, 2)
                one.gateway.start().store.owned.clear()  # the owner as Redis sees a dead one: no lease renewal, no writes
                stopped = time.monotonic()
                rest = read_events(follower)
                waited = time.monotonic() - stopped
            assert [e for e, _, _ in rest[-2:]] == ["error", "done"] and rest[-1][1] == "error"
            assert json.loads(rest[-2][1])["type"] == "interrupted"
            assert waited < 10
            again = stream("GET", two.url + "/chat/stream", headers={"Last-Event-ID": last})
            assert again.names[-2:] == ["error", "done"] and json.loads(again.of("error")[0])["type"] == "interrupted"
            def interrupted_rows() -> list[tuple[str, str, int, int]]:
                found = []
                for db in ("one.db", "two.db"):  # whichever replica noticed first wrote it
                    with contextlib.suppress(sqlite3.OperationalError):  # the ledger makes its table at its first row
                        found += sqlite3.connect(tmp_path / db).execute(
                            "SELECT stream_id, error_type, estimated, completion_tokens FROM usage"
                            " WHERE error_type = 'interrupted'").fetchall()
                return found

            deadline = time.monotonic() + 10
            while not interrupted_rows() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.5)  # a second interruption would have come by now (the lease renewal runs every 1/3 s)
            rows = interrupted_rows()
            assert len(rows) == 1 and rows[0][:3] == (sid, "interrupted", 1) and rows[0][3] >= 3


def test_redis_lost_and_back_mid_stream(redis_server: RedisServer) -> None:
    with FakeUpstream(lambda seen: sse_tokens([f" t{i}" for i in range(150)], pause=0.02)) as upstream:
        env = two_replicas_env(redis_server, upstream, RESUME_GRACE_SECONDS="5")
        with serve(env) as one, serve(env) as two, httpx.Client(timeout=20) as client:
            assert client.get(one.url + "/healthz").json() == {"status": "ok", "store": "redis", "store_ok": True}
            with client.stream("POST", one.url + "/chat/stream", json=BODY) as response:
                first = read_events(response, 3)
                redis_server.stop()
                new = client.post(two.url + "/chat/stream", json=BODY)
                assert new.status_code == 503 and new.json()["error"]["type"] == "store_unavailable"
                assert new.headers["retry-after"] == "1"
                resumed = client.get(two.url + "/chat/stream", headers={"Last-Event-ID": first[-1][2]})
                assert resumed.status_code == 503
                cancel = client.delete(f"{two.url}/chat/stream/{response.headers['x-stream-id']}")
                assert cancel.status_code == 503 and cancel.json()["error"]["type"] == "store_unavailable"
                deadline = time.monotonic() + 10  # the owner notices at its next write
                while (health := client.get(one.url + "/healthz")).json()["store_ok"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert health.status_code == 200 and health.json() == {"status": "ok", "store": "redis", "store_ok": False}
                rest = read_events(response)  # the owner's own reader carries on undisturbed
            events = first + rest
            assert tokens_of(events) == "".join(f" t{i}" for i in range(150)) and events[-1][:2] == ("done", "stop")
            redis_server.start()
            deadline = time.monotonic() + 15
            while client.post(two.url + "/chat/stream?prompt=x", json=BODY).status_code != 200:
                assert time.monotonic() < deadline, "no recovery after Redis came back"
                time.sleep(0.2)
            assert client.get(one.url + "/healthz").json()["store_ok"] is True


def test_an_owner_shutting_down_ends_its_streams_with_shutdown_for_readers_elsewhere(redis_server: RedisServer) -> None:
    with FakeUpstream(slow_reply) as upstream:
        env = two_replicas_env(redis_server, upstream, RESUME_GRACE_SECONDS="30")
        with serve(env) as two, httpx.Client(timeout=20) as client:
            owner = serve(env)
            one = owner.__enter__()
            with client.stream("POST", one.url + "/chat/stream", json=BODY) as response:
                last = read_events(response, 3)[-1][2]
            with client.stream("GET", two.url + "/chat/stream", headers={"Last-Event-ID": last}) as follower:
                read_events(follower, 2)
                owner.__exit__(None, None, None)  # uvicorn's graceful shutdown of the owner
                rest = read_events(follower)
            assert [e for e, _, _ in rest[-2:]] == ["error", "done"] and rest[-1][1] == "error"
            assert json.loads(rest[-2][1])["type"] == "shutdown"
            again = stream("GET", two.url + "/chat/stream", headers={"Last-Event-ID": last})
            assert again.names[-2:] == ["error", "done"] and json.loads(again.of("error")[0])["type"] == "shutdown"


def test_redis_holds_what_the_owner_holds_a_trimmed_position_gets_204_everywhere(redis_server: RedisServer) -> None:
    words = [f" word{i:03}" for i in range(300)]
    env = {"REDIS_URL": redis_server.url, "RESUME_GRACE_SECONDS": "5", "STREAM_BUFFER_BYTES": "2048", "ECHO_DELAY_SECONDS": "0.003"}
    with serve(env) as one, serve(env) as two:
        whole = stream("GET", one.url + "/chat/stream", params={"prompt": "".join(words)})
        sid, count = whole.headers["x-stream-id"], len(whole.events)
        assert whole.text == "".join(words)
        assert stream("GET", one.url + "/chat/stream", headers={"Last-Event-ID": f"{sid}.2"}).status == 204
        assert stream("GET", two.url + "/chat/stream", headers={"Last-Event-ID": f"{sid}.2"}).status == 204
        tail = stream("GET", two.url + "/chat/stream", headers={"Last-Event-ID": f"{sid}.{count - 5}"})
        assert tail.status == 200 and tail.events == whole.events[-5:]
        held = int(redis_server.command("XLEN", f"asgi-stream:{sid}:events")[1:].split(b"\r\n")[0])
        first_entry = redis_server.command("EVAL", "return redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]", "1",
                                           f"asgi-stream:{sid}:events")
        assert 0 < held < count / 4 and int(first_entry.split(b"\r\n")[1].split(b"-")[0]) > count // 2  # old entries trimmed
