"""The OpenAI-compatible route with REDIS_URL: its streams take and free the
same shared slots as /chat/stream (MAX_STREAMS, MAX_STREAMS_PER_KEY exact over
replicas; lease renewed while it runs, a dead owner's slot lapses), while its
events stay with its own client: nothing to follow, resume or cancel elsewhere."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import openai

from tests.conftest import Served, closed_after_test, serve
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - a fixture
from tests.test_lifecycle import BODY
from tests.test_openai_api import endless_reply, tokens_reply
from tests.upstream import FakeUpstream, Reply, Seen

WORDS = [f" w{i}" for i in range(60)]
HOLD = [{"role": "user", "content": "hold"}]  # the fake upstream streams until the gateway hangs up
SHORT = [{"role": "user", "content": "short"}]


def reply(seen: Seen) -> Reply:
    if seen.json["messages"][-1]["content"] == "hold":
        return endless_reply("openai")
    return tokens_reply("openai", WORDS, pause=0.005)


@contextmanager
def replicas(redis: RedisServer, count: int = 2, **extra: str) -> Iterator[tuple[FakeUpstream, list[Served]]]:
    with FakeUpstream(reply) as upstream, ExitStack() as stack:
        env = {"REDIS_URL": redis.url, "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": upstream.url + "/v1", **extra}
        yield upstream, [stack.enter_context(serve(env)) for _ in range(count)]


def sdk(replica: Served, key: str = "-") -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=replica.url + "/v1", api_key=key, max_retries=0, timeout=30))


@contextmanager
def held(replica: Served, key: str = "-") -> Iterator[Any]:
    """A /v1 stream admitted and running (its first chunk is in) until the block ends."""
    with sdk(replica, key).chat.completions.create(model="openai/gpt-4o-mini", messages=HOLD, stream=True) as chunks:
        assert next(iter(chunks)).choices[0].delta.role == "assistant"
        yield chunks


def v1_start(replica: Served, key: str = "-") -> httpx.Response:
    """A /v1 streaming request; an admitted one is closed at once (its slot freed at done)."""
    body = {"model": "openai/gpt-4o-mini", "messages": HOLD, "stream": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", replica.url + "/v1/chat/completions", json=body,
                                                           headers={"Authorization": f"Bearer {key}"}) as response:  # fmt: skip
        response.read() if response.status_code != 200 else None
        return response


def chat_start(replica: Served, key: str = "-") -> httpx.Response:
    with httpx.Client(timeout=30) as client, client.stream("POST", replica.url + "/chat/stream", json=BODY,
                                                           headers={"Authorization": f"Bearer {key}"}) as response:  # fmt: skip
        response.read() if response.status_code != 200 else None
        return response


def eventually(condition: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def held_slots(redis: RedisServer, key: str = "asgi-stream:slots") -> int:
    return int(redis.command("ZCARD", key)[1:].split(b"\r\n")[0])


def refused_as(response: httpx.Response, status: int, code: str, openai_shape: bool) -> bool:
    if response.status_code != status:
        return False
    error = response.json()["error"]
    return response.headers.get("retry-after") == "1" and \
        (error["code"] if openai_shape else error["type"]) == code


def test_v1_streams_count_against_max_streams_on_every_replica(redis_server: RedisServer) -> None:
    with replicas(redis_server, MAX_STREAMS="2") as (upstream, (one, two)):
        with held(one) as first, held(two):
            assert held_slots(redis_server) == 2
            for replica in (one, two):  # each replica holds only one stream itself: its own counter would admit
                assert refused_as(v1_start(replica), 503, "overloaded", openai_shape=True)
                assert refused_as(chat_start(replica), 503, "overloaded", openai_shape=False)
                error = v1_start(replica).json()["error"]
                assert error["type"] == "server_error" and error["param"] is None
            first.close()  # one ends: its slot comes free once its done is written
            assert eventually(lambda: v1_start(two).status_code == 200)
            with held(two):  # full again
                assert refused_as(v1_start(one), 503, "overloaded", openai_shape=True)
        assert eventually(lambda: held_slots(redis_server) == 0)
        assert len(upstream.seen) == 4  # the two held streams and the two admitted after: refusals never reached it


def test_v1_streams_count_against_max_streams_per_key_on_every_replica(redis_server: RedisServer) -> None:
    keys = {"API_KEYS": "alice:gw-alice,bob:gw-bob", "MAX_STREAMS_PER_KEY": "2", "MAX_STREAMS": "10"}
    with replicas(redis_server, **keys) as (_, (one, two)):
        with held(one, "gw-alice") as first, held(two, "gw-alice"):
            assert held_slots(redis_server, "asgi-stream:slots:key:alice") == 2
            for replica in (one, two):
                assert refused_as(v1_start(replica, "gw-alice"), 429, "rate_limited", openai_shape=True)
                assert refused_as(chat_start(replica, "gw-alice"), 429, "rate_limited", openai_shape=False)
                assert v1_start(replica, "gw-bob").status_code == 200  # another key is not limited by alice's
            with held(one, "gw-bob"), held(two, "gw-bob"):  # bob at his limit too; the service (10) is not full
                assert held_slots(redis_server) == 4
            first.close()
            assert eventually(lambda: v1_start(two, "gw-alice").status_code == 200)
        assert eventually(lambda: held_slots(redis_server) == 0)


def test_a_v1_stream_streams_through_the_sdk_and_keeps_its_events_out_of_redis(redis_server: RedisServer) -> None:
    with replicas(redis_server) as (_, (one, two)):
        pieces = []
        chunks = sdk(one).chat.completions.create(model="openai/gpt-4o-mini", messages=SHORT, stream=True,
                                                  stream_options={"include_usage": True})  # fmt: skip
        for chunk in chunks:
            pieces.append(chunk)
        assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == "".join(WORDS)
        assert pieces[-2].choices[0].finish_reason == "stop" and pieces[-1].usage is not None
        whole = sdk(two).chat.completions.create(model="openai/gpt-4o-mini", messages=SHORT)
        assert whole.choices[0].message.content == "".join(WORDS)
        assert eventually(lambda: held_slots(redis_server) == 0)
        # its id is public (chatcmpl-<id>), but no replica serves or cancels it on /chat/stream
        stream_id = pieces[0].id.removeprefix("chatcmpl-")
        with held(one) as running:
            running_id = next(iter(running)).id.removeprefix("chatcmpl-")
            for replica in (one, two):
                for sid in (stream_id, running_id):
                    assert httpx.get(replica.url + "/chat/stream", headers={"Last-Event-ID": f"{sid}.1"}).status_code == 204
                    assert httpx.delete(f"{replica.url}/chat/stream/{sid}").status_code == 404
            assert redis_server.command("KEYS", "asgi-stream:*:*s").startswith(b"*0")  # no events or meta key of /v1
            assert held_slots(redis_server) == 1


def test_a_v1_slot_lease_is_renewed_while_it_runs_and_lapses_with_its_dead_owner(redis_server: RedisServer) -> None:
    with replicas(redis_server, MAX_STREAMS="1", OWNER_LEASE_SECONDS="2") as (_, (one, two)):
        with held(one):
            time.sleep(5)  # past two leases: only the renewal keeps the slot
            assert refused_as(v1_start(two), 503, "overloaded", openai_shape=True)
            one.gateway.start().store.owned.clear()  # type: ignore[attr-defined] - the owner as Redis sees a dead one: no renewal
            assert eventually(lambda: v1_start(two).status_code == 200)


def test_without_redis_a_v1_stream_is_still_neither_resumable_nor_cancellable_on_chat_stream() -> None:
    with FakeUpstream(reply) as upstream, \
            serve({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": upstream.url + "/v1", "MAX_STREAMS": "1"}) as one:
        with held(one) as running:
            sid = next(iter(running)).id.removeprefix("chatcmpl-")
            assert httpx.get(one.url + "/chat/stream", headers={"Last-Event-ID": f"{sid}.1"}).status_code == 204
            assert httpx.delete(f"{one.url}/chat/stream/{sid}").status_code == 404
            assert refused_as(v1_start(one), 503, "overloaded", openai_shape=True)  # the process's own limit, as before
        assert eventually(lambda: v1_start(one).status_code == 200)
