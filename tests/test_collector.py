"""The collector while the gateway serves (asgi_stream_core/collector.py): the
youngest threshold at GC_THRESHOLD, the two younger generations collected
every GC_INTERVAL_SECONDS (paced by the open streams), everything once the
heap has doubled (CPython's own full collections off meanwhile, at most 1% of
the time in ours), and the process's own thresholds given back at the end."""

from __future__ import annotations

import gc
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_stream_core.collector import GROWTH, LONGEST, NEVER, SHARE, STREAMS_AT_INTERVAL, FullCollections, collecting, young_period
from tests.conftest import serve


@pytest.fixture
def pythons_own() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield (700, 10, 10)
    gc.set_threshold(*before)


@contextmanager
def counted_collections() -> Iterator[Callable[[int], int]]:
    """How many collections of each generation ended while inside (any thread's)."""
    ended: list[int] = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop":
            ended.append(info["generation"])

    gc.callbacks.append(count)
    try:
        yield ended.count
    finally:
        gc.callbacks.remove(count)


@pytest.mark.parametrize(("env", "serving"), [({}, (10_000, 10, NEVER)), ({"GC_THRESHOLD": "2500"}, (2500, 10, NEVER)),
                                               ({"GC_INTERVAL_SECONDS": "0"}, (10_000, 10, 10)),
                                               ({"GC_THRESHOLD": "0", "GC_INTERVAL_SECONDS": "0"}, (700, 10, 10))])  # fmt: skip
def test_the_thresholds_are_the_settings_while_serving_and_given_back_after(
    pythons_own: tuple[int, int, int], env: dict[str, str], serving: tuple[int, int, int]
) -> None:
    with serve(env) as served:
        assert httpx.get(served.url + "/healthz", timeout=10).status_code == 200
        assert gc.get_threshold() == serving
    assert gc.get_threshold() == pythons_own


@pytest.mark.parametrize(("interval", "at_least", "at_most"), [("0.0001", 5, None), ("0", None, 3)])
def test_the_younger_generations_are_collected_by_time_while_serving_and_not_after(
    pythons_own: tuple[int, int, int], interval: str, at_least: int | None, at_most: int | None
) -> None:
    """With no stream open the period is 1,000 times the interval: 0.1 s here."""
    with serve({"GC_INTERVAL_SECONDS": interval}):
        with counted_collections() as ended:
            time.sleep(1.0)  # 10 periods: at least 5 even on a machine five times slower
        if at_least is not None:
            assert ended(1) >= at_least
        if at_most is not None:  # by count alone an idle server allocates too little for any
            assert ended(1) <= at_most
    with counted_collections() as ended:
        time.sleep(0.5)
    assert ended(1) <= 1  # the task stopped with the lifespan


def test_open_streams_shorten_the_period(pythons_own: tuple[int, int, int]) -> None:
    """The gateway paces the collector by its open streams: with the interval at 1 ms,
    1 s with none open, 0.1 s with ten (echo streams held between two slow tokens),
    from the end of the period in progress when they opened."""
    with serve({"GC_INTERVAL_SECONDS": "0.001", "ECHO_DELAY_SECONDS": "30"}) as served:

        async def held_open(streams: int) -> int:
            async with httpx.AsyncClient(base_url=served.url, timeout=10) as client, anyio.create_task_group() as tasks:
                opened = anyio.Semaphore(0)

                async def hold() -> None:
                    async with client.stream("POST", "/chat/stream", json={"messages": [{"role": "user", "content": "a b c"}]}) as response:
                        assert response.status_code == 200
                        opened.release()
                        await anyio.sleep_forever()

                for _ in range(streams):
                    tasks.start_soon(hold)
                for _ in range(streams):
                    await opened.acquire()
                await anyio.sleep(LONGEST * 1.1)  # the period in progress when they opened ends
                with counted_collections() as ended:
                    await anyio.sleep(1.0)
                tasks.cancel_scope.cancel()
            return ended(1)

        assert anyio.run(held_open, 10) >= 5  # 10 periods: 5 even on a machine five times slower
        assert anyio.run(held_open, 0) <= 2


@given(st.floats(0.001, 10), st.integers(0, 10**6), st.integers(0, 10**6))
def test_the_young_period_is_the_interval_from_a_thousand_streams_and_longer_with_fewer_up_to_a_second(
    interval: float, streams: int, more: int
) -> None:
    period = young_period(interval, streams)
    assert young_period(interval, streams + more) <= period  # more streams, never a longer period
    assert interval <= period <= max(interval, LONGEST)
    if streams >= STREAMS_AT_INTERVAL:
        assert period == interval
    elif interval * STREAMS_AT_INTERVAL / max(streams, 1) <= LONGEST:
        assert period == pytest.approx(interval * STREAMS_AT_INTERVAL / max(streams, 1))


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_old_cyclic_garbage_is_collected_once_the_heap_has_doubled(pythons_own: tuple[int, int, int]) -> None:
    """The garbage is in the oldest generation, where only a full collection finds it,
    and the heap grows by objects the collector does not track (bare objects, the
    smallest blocks, 16 bytes and a list slot each): CPython's own
    schedule, driven by tracked allocations, would never collect it."""
    with serve({"GC_INTERVAL_SECONDS": "0.00005"}):  # every 50 ms with no stream open
        cycle = Cycle()
        gone = weakref.ref(cycle)
        time.sleep(0.3)  # promoted by the collections by time
        del cycle
        time.sleep(0.3)
        assert gone() is not None, "collected without a full collection"
        growth = [object() for _ in range(int(sys.getallocatedblocks() * (GROWTH - 1) * 1.2))]
        deadline = time.monotonic() + 20  # a full collection of this test process: up to a second on a slow machine
        while gone() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone() is None
        del growth


@given(st.integers(1, 10**8), st.integers(0, 10**8), st.floats(0, 1e6), st.floats(0, 10), st.floats(0, 1e6))
def test_a_full_collection_is_due_past_the_growth_and_its_cost_a_hundredfold_after(
    heap_after: int, heap: int, started: float, took: float, later: float
) -> None:
    schedule = FullCollections(heap_after).after(started, started + took, heap_after)
    now, wait = started + took + later, took / SHARE
    if later > wait * (1 + 1e-9) + 1e-6:  # off the boundary, where rounding decides
        assert schedule.due(now, heap) == (heap > heap_after * GROWTH)
    elif later < wait * (1 - 1e-9) - 1e-6:
        assert not schedule.due(now, heap)


@pytest.mark.anyio
async def test_in_process_on_both_loops_the_task_collects_and_stops(anyio_backend: str, pythons_own: tuple[int, int, int]) -> None:
    with counted_collections() as ended:
        async with collecting(5000, 0.02, lambda: STREAMS_AT_INTERVAL):
            assert gc.get_threshold() == (5000, 10, NEVER)
            await anyio.sleep(0.5)
        collected = ended(1)
        await anyio.sleep(0.2)
    assert collected >= 5
    assert ended(1) == collected
    assert gc.get_threshold() == pythons_own
