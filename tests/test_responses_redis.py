"""/v1/responses state with REDIS_URL, in-process on asyncio and trio: a
response stored through one gateway is continued through another on the
same real Redis (any replica resolves `previous_response_id`), still bound to
the key that made it."""

from __future__ import annotations

import orjson
import pytest

from tests.redis_server import RedisServer, redis_server  # noqa: F401 - a fixture
from tests.test_inprocess import post_json, request
from tests.test_redis_inprocess import running

pytestmark = pytest.mark.anyio


async def test_a_response_stored_on_one_replica_continues_on_another(redis_server: RedisServer) -> None:
    env = {"REDIS_URL": redis_server.url, "API_KEYS": "a:ka,b:kb"}
    async with running(env) as one, running(env) as two:
        def keyed(key: str, body: dict[str, object]) -> dict[str, object]:
            sent = post_json(body)
            return {**sent, "headers": [*sent["headers"], ("authorization", f"Bearer {key}")]}  # type: ignore[misc]

        first = await request(one, "POST", "/v1/responses", **keyed("ka", {"model": "echo", "input": "first words"}))
        assert first.status == 200, first.body
        response_id = orjson.loads(first.body)["id"]
        follow = {"model": "echo", "input": "second words", "previous_response_id": response_id}
        second = await request(two, "POST", "/v1/responses", **keyed("ka", follow))
        assert second.status == 200, second.body
        assert orjson.loads(second.body)["output"][0]["content"][0]["text"] == "second words"
        foreign = await request(two, "POST", "/v1/responses", **keyed("kb", follow))
        error = orjson.loads(foreign.body)["error"]
        assert foreign.status == 400 and error["param"] == "previous_response_id" and response_id in error["message"]
        kept = await request(one, "POST", "/v1/responses", **keyed("ka", {"model": "echo", "input": "x", "store": False}))
        unkept = {"model": "echo", "input": "y", "previous_response_id": orjson.loads(kept.body)["id"]}
        assert (await request(two, "POST", "/v1/responses", **keyed("ka", unkept))).status == 400  # store: false keeps nothing
