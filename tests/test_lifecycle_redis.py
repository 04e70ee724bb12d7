"""The lifecycle tests of test_lifecycle.py again, with the Redis store: every
gateway these tests serve gets REDIS_URL of one real redis-server, flushed
between tests. (The same tests run on the in-process store in their own module.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import conftest
from tests.redis_server import RedisServer
from tests.test_lifecycle import (  # noqa: F401 - collected here a second time, on the Redis store
    test_a_dropped_client_keeps_the_generation_for_the_grace_then_it_is_cancelled,
    test_a_stream_open_at_shutdown_ends_with_a_shutdown_error_and_its_ledger_row,
    test_another_api_key_can_neither_resume_nor_cancel,
    test_api_keys_are_required_when_configured,
    test_cors_preflight_and_headers_for_listed_origins_only,
    test_cut_connections_resume_losslessly_with_one_upstream_request,
    test_delete_cancels_at_once_despite_the_resume_grace,
    test_every_ending_writes_one_ledger_row_that_survives_a_restart,
    test_metrics_count_streams_tokens_errors_and_latencies,
    test_resume_after_the_stream_finished_replays_the_rest,
    test_stream_limits_answer_503_and_429_with_retry_after_and_free_the_slot_at_done,
    test_unresumable_ids_get_204_so_eventsource_stops,
)


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


def connections(server: RedisServer) -> int:
    stats = server.command("INFO", "stats").decode()
    return int(stats.split("total_connections_received:")[1].split()[0])


@pytest.fixture(autouse=True)
def on_the_redis_store(shared_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    assert shared_redis.command("FLUSHALL").startswith(b"+OK")
    monkeypatch.setitem(conftest.BASE_ENV, "REDIS_URL", shared_redis.url)
    before = connections(shared_redis)
    yield
    assert connections(shared_redis) > before + 1  # the gateways of the test did use Redis (not only this check)
