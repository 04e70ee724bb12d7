"""The Redis store over real sockets: two gateways (uvicorn in threads) on one
real redis-server are one service: resume, cancel, grace and limits across
them, a dead owner's streams interrupted, and a Redis outage answered."""

from __future__ import annotations

import random
import time

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
        assert ids == list(range(1, len(ids) + 1))
        assert [e for e, _, _ in events][-2:] == ["usage", "done"]
        assert len(upstream.seen) == 1 and connections > 4
        finished = stream("GET", two.url + "/chat/stream", headers={"Last-Event-ID": events[-1][2]})
        assert finished.status == 204
        replay = stream("GET", two.url + "/chat/stream", headers={"Last-Event-ID": events[2][2]})
        assert replay.events == events[3:]
