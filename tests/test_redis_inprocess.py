"""The Redis store in-process, on asyncio and on trio: several gateways in one
event loop on one real redis-server. The limits' Lua check-and-take under a
burst, the write-behind's entry ids, resume on another gateway, and startup
against an unreachable Redis."""

from __future__ import annotations

import math
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import coredis
import orjson
import pytest

from asgi_stream import Gateway
from asgi_stream_core.record import StreamRecord
from asgi_stream_core.stores.redis import ORPHANS, SLOTS, ended_by_key, events_key, key_slots, unpack
from asgi_stream_core.types import Refusal
from providers import ChatRequest
from tests.conftest import free_port
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - a fixture
from tests.test_inprocess import ENV, Exchange, exchange, request, sse_events

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def running(env: dict[str, str]) -> AsyncIterator[Gateway]:
    """A gateway through its lifespan startup; shut down on exit."""
    app = Gateway({**ENV, **env})
    answers: list[dict[str, Any]] = []
    shutdown = anyio.Event()

    async def receive() -> dict[str, Any]:
        if not answers:
            return {"type": "lifespan.startup"}
        await shutdown.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: dict[str, Any]) -> None:
        answers.append(message)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(app, {"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        with anyio.fail_after(10):
            while not answers:
                await anyio.sleep(0.01)
        assert answers == [{"type": "lifespan.startup.complete"}], answers
        try:
            yield app
        finally:
            shutdown.set()
    assert answers[-1] == {"type": "lifespan.shutdown.complete"}


def record_for(key_name: str | None) -> StreamRecord:
    # a fresh id each time: id(object()) is reused at once, and two records with
    # one id share a slot, which lets a burst take one more than the limit
    request = ChatRequest([{"role": "user", "content": "hi"}], "echo", "echo", 10, None)
    return StreamRecord(f"s{uuid.uuid4().hex}", key_name, request, 1 << 20)


async def test_a_burst_of_admissions_over_several_gateways_takes_exactly_the_limits(redis_server: RedisServer) -> None:
    # a long lease: this is about the check-and-take alone, not leases lapsing on a starved machine
    env = {"REDIS_URL": redis_server.url, "MAX_STREAMS": "7", "MAX_STREAMS_PER_KEY": "3", "API_KEYS": "a:ka,b:kb,c:kc",
           "OWNER_LEASE_SECONDS": "120"}
    async with running(env) as one, running(env) as two, running(env) as three:
        outcomes: list[tuple[str, str]] = []

        async def admit(app: Gateway, key_name: str) -> None:
            try:
                await app.start().store.hold(record_for(key_name))
                outcomes.append((key_name, "held"))
            except Refusal as exc:
                outcomes.append((key_name, exc.type))

        async def burst(keys: str) -> list[tuple[str, str]]:
            outcomes.clear()
            async with anyio.create_task_group() as tasks:
                for i in range(40):
                    tasks.start_soon(admit, (one, two, three)[i % 3], keys[i % len(keys)])
            return sorted(outcomes)

        assert await burst("a") == [("a", "held")] * 3 + [("a", "rate_limited")] * 37  # the key's limit, exactly
        second = await burst("bc")
        held = [k for k, outcome in second if outcome == "held"]
        assert len(held) == 4 and held.count("b") <= 3 and held.count("c") <= 3  # then the global one, exactly
        assert len(second) == 40 and {o for _, o in second} <= {"held", "overloaded", "rate_limited"}
        assert ("b", "overloaded") in second or ("c", "overloaded") in second
        assert redis_server.command("ZCARD", "asgi-stream:slots") == b":7\r\n"


async def test_events_reach_redis_as_entries_whose_ids_are_event_positions(redis_server: RedisServer) -> None:
    async with running({"REDIS_URL": redis_server.url}) as app:
        ex = await request(app, "GET", "/chat/stream", "prompt=" + "word%20" * 30)
        events = [event for event in sse_events(ex.body) if event[0] != "stream"]  # the opening event is not held: it names the stream
        stream_id = ex.headers["x-stream-id"]
        with anyio.fail_after(5):
            while app.start().store.owned:
                await anyio.sleep(0.01)
        client = coredis.Redis.from_url(redis_server.url)
        async with client:
            entries = await client.xrange(events_key(stream_id), "-", "+")
            meta = await client.hgetall(f"asgi-stream:{stream_id}:meta")
            ttl = await client.pttl(events_key(stream_id))
    positions: list[int] = []
    replayed: list[tuple[str, str]] = []
    for entry in entries:
        first, packed = unpack(entry.identifier, entry.field_values[b"e"])  # type: ignore[arg-type]
        assert first == len(positions) + 1  # entries follow each other without gap or overlap
        positions += range(first, first + len(packed))
        replayed += [(name, data) for name, data in packed]
    assert positions == list(range(1, len(events) + 1))
    assert replayed == [(name, data) for name, data, _ in events]
    assert len(entries) < len(events)  # appends share entries (one per flush), not one each
    assert meta[b"finished"] == b"stop" and int(meta[b"count"]) == len(events)
    assert 0 < ttl <= 60_000  # a finished stream expires after RESUME_TTL_SECONDS


async def test_a_resume_on_another_gateway_replays_from_redis_then_follows(redis_server: RedisServer) -> None:
    env = {"REDIS_URL": redis_server.url, "ECHO_DELAY_SECONDS": "0.01", "RESUME_GRACE_SECONDS": "5"}
    async with running(env) as one, running(env) as two:
        whole = await request(one, "GET", "/chat/stream", "prompt=" + "w%20" * 40)
        events = sse_events(whole.body)
        last_id = events[4][2]
        rest = await request(two, "GET", "/chat/stream", headers=[("last-event-id", last_id)])
        assert sse_events(rest.body) == events[5:]
        assert rest.headers["x-stream-id"] == whole.headers["x-stream-id"]
        gone = await request(two, "GET", "/chat/stream", headers=[("last-event-id", events[-1][2])])
        assert gone.status == 204
        health = await request(two, "GET", "/healthz")
        assert health.body == b'{"status":"ok","store":"redis","store_ok":true}'


async def test_startup_fails_naming_redis_url_without_its_password() -> None:
    app = Gateway({**ENV, "REDIS_URL": f"redis://user:hunter2@127.0.0.1:{free_port()}/3"})
    answers: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        answers.append(message)

    with anyio.fail_after(10):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert len(answers) == 1 and answers[0]["type"] == "lifespan.startup.failed"
    message = answers[0]["message"]
    assert message.startswith("asgi-stream: REDIS_URL=redis://user:[redacted]@127.0.0.1:") and "unreachable" in message
    assert "hunter2" not in message


LAPSE = {"ECHO_DELAY_SECONDS": "0.05", "OWNER_LEASE_SECONDS": "120", "API_KEYS": "a:ka,b:kb"}  # renewals only when the test asks
WORDS = 100  # 5 s of echo tokens: the test acts well within them, even four times slower


@asynccontextmanager
async def owned_stream(app: Gateway, words: int = WORDS) -> AsyncIterator[tuple[Exchange, str]]:
    """A stream of key a's running on `app`, one echo token every 50 ms: its exchange and id."""
    async with exchange(app, "GET", "/chat/stream", "prompt=" + "w%20" * words, [("authorization", "Bearer ka")]) as first:
        assert (await first.next())["status"] == 200
        await first.next_body()  # it runs
        (stream_id,) = app.start().store.owned
        yield first, stream_id


@pytest.mark.parametrize(
    ("limits", "newcomer", "given_away"),
    [
        ({"MAX_STREAMS": "1"}, "kb", True),  # the one slot went to the newcomer
        ({"MAX_STREAMS": "2"}, "kb", False),  # room for both: the owner takes its slot back
        ({"MAX_STREAMS_PER_KEY": "1"}, "ka", True),  # its key's one slot went to the newcomer
        ({"MAX_STREAMS_PER_KEY": "1"}, "kb", False),  # the newcomer holds another key's slot
    ],
)
async def test_a_stream_whose_lease_lapsed_gets_its_slot_back_only_if_it_was_not_given_away(
    redis_server: RedisServer, limits: dict[str, str], newcomer: str, given_away: bool
) -> None:
    # The lease of a live owner lapses when its loop is starved, or Redis is away, for a whole lease.
    # Its slot may then go to a new stream; taking it back at the next renewal broke the limits.
    env = {"REDIS_URL": redis_server.url, **LAPSE, **limits}
    async with running(env) as one, running(env) as two:
        async with owned_stream(one) as (first, stream_id):
            for slots in (SLOTS, key_slots("a")):  # its lease, lapsed
                redis_server.command("ZADD", slots, "1", stream_id)
            newcomer_prompt = "prompt=" + "n%20" * WORDS  # it holds its slot while the test looks
            async with exchange(two, "GET", "/chat/stream", newcomer_prompt, [("authorization", f"Bearer {newcomer}")]) as second:
                assert (await second.next())["status"] == 200
                assert redis_server.command("SMEMBERS", ORPHANS) == f"*1\r\n${len(stream_id)}\r\n{stream_id}\r\n".encode()
                assert one.start().store.client is not None
                await one.start().store.renew_leases(one.start().store.client)
                assert redis_server.command("SCARD", ORPHANS) == b":0\r\n"  # claimed by its owner: no replica interrupts it
                assert redis_server.command("ZCARD", SLOTS) == (b":1\r\n" if given_away else b":2\r\n")
                with anyio.fail_after(30):  # the rest of its tokens, if it kept its slot
                    await first.done.wait()
    if given_away:
        assert_ended_on_losing_its_slot(first.body)
    else:
        assert_whole(first.body)


@pytest.mark.parametrize("ended_elsewhere", [False, True])
async def test_a_running_stream_redis_forgot_is_taken_back_unless_a_replica_began_to_end_it(
    redis_server: RedisServer, ended_elsewhere: bool
) -> None:
    # Not in the slots and not an orphan: Redis restarted empty (it comes back, with room), or a
    # replica found it orphaned and claimed it (SPOP, then SET ended-by): that replica ends it.
    async with running({"REDIS_URL": redis_server.url, **LAPSE, "MAX_STREAMS": "1"}) as one:
        async with owned_stream(one) as (first, stream_id):
            redis_server.command("DEL", SLOTS, key_slots("a"))
            if ended_elsewhere:
                redis_server.command("SET", ended_by_key(stream_id), "another-replica")
            assert one.start().store.client is not None
            await one.start().store.renew_leases(one.start().store.client)
            assert redis_server.command("ZCARD", SLOTS) == (b":0\r\n" if ended_elsewhere else b":1\r\n")
            with anyio.fail_after(30):
                await first.done.wait()
    if ended_elsewhere:
        assert_ended_on_losing_its_slot(first.body)
    else:
        assert_whole(first.body)


async def test_an_owner_cut_off_while_another_replica_ended_its_stream_ends_it_the_same_way_with_one_row(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # To Redis an owner whose lease lapsed looks dead: another replica ends its stream (`interrupted`)
    # and writes its row. The owner, alive, learns it at its next write and must tell its own
    # client the same, not `cancelled`; the shared ledger keeps one row.
    env = {"REDIS_URL": redis_server.url, **LAPSE, "USAGE_DB": str(tmp_path / "usage.db")}
    async with running(env) as one, running(env) as two:
        async with owned_stream(one) as (first, stream_id):
            redis_server.command("ZADD", SLOTS, "1", stream_id)  # its lease, lapsed
            assert two.start().store.client is not None
            await two.start().store.renew_leases(two.start().store.client)  # finds the orphan and ends it
            with anyio.fail_after(30):
                await first.done.wait()
        assert stream_id not in one.start().store.owned
    assert_ended_on_losing_its_slot(first.body)
    rows = sqlite3.connect(tmp_path / "usage.db").execute("SELECT stream_id, finish_reason, error_type FROM usage").fetchall()
    assert rows == [(stream_id, "error", "interrupted")]


async def test_an_owner_back_from_a_stall_renews_before_it_writes_so_it_never_writes_past_an_ending_made_elsewhere(
    redis_server: RedisServer,
) -> None:
    # A stalled owner's first write may carry several events: its entry id is then above the
    # ending another replica wrote, so XADD alone would not refuse it. An owner whose last
    # renewal is older than a lease renews first and learns that the stream was ended.
    env = {"REDIS_URL": redis_server.url, **LAPSE}
    async with running(env) as one, running(env) as two:
        async with owned_stream(one) as (first, stream_id):
            record = one.start().store.owned[stream_id][0]
            redis_server.command("ZADD", SLOTS, "1", stream_id)  # its lease, lapsed
            assert two.start().store.client is not None
            await two.start().store.renew_leases(two.start().store.client)  # finds the orphan and ends it in Redis
            one.start().store.renewed = -math.inf  # the owner was stalled: no renewal for longer than a lease
            for _ in range(5):  # what it read while stalled, all in its next write
                record.append("token", "x")
            with anyio.fail_after(30):
                await first.done.wait()
        client = coredis.Redis.from_url(redis_server.url)
        async with client:
            entries = await client.xrange(events_key(stream_id), "-", "+")
    _, last = unpack(entries[-1].identifier, entries[-1].field_values[b"e"])  # type: ignore[arg-type]
    assert [name for name, _ in last] == ["error", "done"]
    assert orjson.loads(last[0][1])["message"] == "the process running this generation stopped"  # the other replica's
    assert_ended_on_losing_its_slot(first.body)  # and the owner told its client the same


async def test_delete_of_a_running_stream_whose_owner_is_not_listening_is_503_not_404(redis_server: RedisServer) -> None:
    # What a SIGKILLed owner leaves in Redis until its lease lapses: a running stream's meta, and
    # nobody on its channel. 404 would say "no running stream", which its readers would contradict.
    async with running({"REDIS_URL": redis_server.url}) as app:
        redis_server.command("HSET", "asgi-stream:s-ghost:meta", "key", "", "owner", "gone", "count", "3", "first", "0")
        answer = await request(app, "DELETE", "/chat/stream/s-ghost")
        assert (answer.status, answer.headers["retry-after"]) == (503, "1")
        assert orjson.loads(answer.body)["error"]["type"] == "store_unavailable"
        redis_server.command("HSET", "asgi-stream:s-ghost:meta", "finished", "error")  # then it ended: interrupted
        assert (await request(app, "DELETE", "/chat/stream/s-ghost")).status == 404


@asynccontextmanager
async def forgotten_by_redis(redis_server: RedisServer, one: Gateway) -> AsyncIterator[tuple[Exchange, str]]:
    """A stream of `one`'s, running when Redis restarts empty (FLUSHALL), until
    the owner's next flush has written its progress: count, first and tokens,
    but not what admission wrote (key, owner, backend...)."""
    async with owned_stream(one, words=40) as (first, stream_id):
        redis_server.command("FLUSHALL")
        with anyio.fail_after(10):
            while redis_server.command("EXISTS", f"asgi-stream:{stream_id}:meta") != b":1\r\n":
                await anyio.sleep(0.01)
        yield first, stream_id


async def test_a_stream_redis_forgot_gets_clear_answers_elsewhere_until_its_owner_describes_it_again(redis_server: RedisServer) -> None:
    # Reading the partial meta raised KeyError in resume and DELETE. The owner's renewal takes
    # the slot back and writes the meta again: resumes from what Redis holds work again.
    key = [("authorization", "Bearer ka")]
    async with running({"REDIS_URL": redis_server.url, **LAPSE}) as one, running({"REDIS_URL": redis_server.url, **LAPSE}) as two:
        async with forgotten_by_redis(redis_server, one) as (first, stream_id):
            resumed = await request(two, "GET", "/chat/stream", headers=[("last-event-id", f"{stream_id}.1"), *key])
            assert resumed.status == 204  # nothing says whose it is: nothing to replay
            assert (await request(two, "DELETE", f"/chat/stream/{stream_id}", headers=key)).status == 404
            assert one.start().store.client is not None
            await one.start().store.renew_leases(one.start().store.client)
            assert redis_server.command("ZCARD", SLOTS) == b":1\r\n"
            held = one.start().store.owned[stream_id][1].flushed  # the last position Redis holds
            rest = await request(two, "GET", "/chat/stream", headers=[("last-event-id", f"{stream_id}.{held}"), *key])
            with anyio.fail_after(30):
                await first.done.wait()
    whole = sse_events(first.body)
    assert rest.status == 200 and sse_events(rest.body) == whole[held + 1 :]  # the opening event has position 0
    assert whole[-1][:2] == ("done", "stop")


async def test_a_dead_owner_s_stream_redis_forgot_is_still_ended_without_a_row(redis_server: RedisServer) -> None:
    async with running({"REDIS_URL": redis_server.url, **LAPSE}) as one, running({"REDIS_URL": redis_server.url, **LAPSE}) as two:
        async with forgotten_by_redis(redis_server, one) as (first, stream_id):
            redis_server.command("SADD", ORPHANS, stream_id)  # taken for dead
            assert two.start().store.client is not None
            await two.start().store.renew_leases(two.start().store.client)  # raised KeyError reading the meta for its row
            assert redis_server.command("HGET", f"asgi-stream:{stream_id}:meta", "finished") == b"$5\r\nerror\r\n"
            with anyio.fail_after(30):
                await first.done.wait()
    assert sse_events(first.body)[-1][:2] == ("done", "error")  # the owner learned that it was ended elsewhere


def assert_ended_on_losing_its_slot(body: bytes) -> None:
    """At once, with the error a replica that found it orphaned writes."""
    events = sse_events(body)
    assert [name for name, _, _ in events[-2:]] == ["error", "done"] and events[-1][1] == "error"
    error = orjson.loads(events[-2][1])
    assert error["type"] == "interrupted" and "slot lease lapsed" in error["message"]
    assert len([name for name, _, _ in events if name == "token"]) < WORDS


def assert_whole(body: bytes) -> None:
    events = sse_events(body)
    assert events[-1][:2] == ("done", "stop") and "".join(d for n, d, _ in events if n == "token") == "w " * WORDS
