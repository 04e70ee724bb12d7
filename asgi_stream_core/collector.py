"""Python's cyclic garbage collector while the gateway serves (issue 25): the
two younger generations collected every GC_INTERVAL_SECONDS as well as after
GC_THRESHOLD allocations, and everything once the heap has doubled since the
last full collection, in at most 1% of the time. Given back at shutdown.

Why by time. A held stream waits in an upstream read, and each read (a
keep-alive comment every few seconds) replaces the ~46 objects its suspended
call stack is made of (httpx's, httpcore's and anyio's coroutines, async
generator steps, context managers) with new ones. The old ones die, so
CPython's count of net allocations barely moves while its youngest generation
fills with every held stream's new stack, and the collection the count
finally starts walks them all: with 1,000 streams held, 46,229 young objects
in 14.7-23 ms (logged in the gateway with `gc.callbacks` during the shared
harness's `held`), started by whichever request allocated last: a new
stream's first token p99 17.5-17.8 ms against 4.4-6.1 idle. Collected every
20 ms, a collection walks 20 ms of new stacks: the probe p99 with 1,000 held
4.1-5.6 ms against 4.7-5.8 idle.

Why by growth, not by CPython's rule. CPython collects everything once the
objects promoted since its last full collection reach a quarter of the old
generation. The replaced stacks are promoted too, though they die soon after,
so promotions overstate growth. The heap's size (`sys.getallocatedblocks()`)
says whether cyclic garbage is piling up. Growth by a quarter made a dozen
full collections in a 5,000-stream ramp, the last ones 300-535 ms each, and
one of 135 ms after a 1,000-stream ramp; doubling, two to four. A full
collection that took D is not run again for D / 1%.

The interval is for 1,000 streams open or more; with fewer, whose stacks are
made more slowly, it is proportionally longer, at most 1 s: at 20 ms always,
the collections cost a gateway serving one stream 53 k instructions per token
30 ms apart (bench/instructions.py, `spaced`: 357 k against 304 k).

GC_INTERVAL_SECONDS=0 keeps CPython's own schedule, with GC_THRESHOLD (0:
Python's 700) as its youngest threshold. Figures: docs/benchmarks.md, "Issue 25".
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

__all__ = ["FullCollections", "collecting", "young_period"]

GROWTH = 2.0  # a full collection once the heap has doubled since the last one (Go's default, GOGC=100)
SHARE = 0.01  # at most this share of the time in full collections
LOOK_EVERY = 1.0  # s between two looks at the heap's size (0.1 ms each with 6 million blocks allocated)
NEVER = 2**31 - 1  # CPython's own full collections, off while ours run
STREAMS_AT_INTERVAL = 1000  # GC_INTERVAL_SECONDS is the period with this many streams open or more
LONGEST = 1.0  # s: the period with one stream open, or none (unless the interval is longer)


def young_period(interval: float, streams: int) -> float:
    """The time to the next collection of the young: `interval` with STREAMS_AT_INTERVAL
    streams open or more, proportionally longer with fewer, at most LONGEST."""
    return min(max(interval, LONGEST), interval * max(1.0, STREAMS_AT_INTERVAL / max(streams, 1)))


@dataclass(frozen=True, slots=True)
class FullCollections:
    """When the next full collection may run: the heap's size (allocated
    blocks) after the last one, and the time before which none runs again."""

    heap_after_last: int
    not_before: float = 0.0

    def due(self, now: float, heap: int) -> bool:
        return now >= self.not_before and heap > self.heap_after_last * GROWTH

    def after(self, started: float, ended: float, heap: int) -> FullCollections:
        """The schedule after a full collection from `started` to `ended` that left `heap` blocks."""
        return FullCollections(heap, ended + (ended - started) / SHARE)


async def collect_by_time(interval: float, streams: Callable[[], int]) -> None:
    """Every young period the two younger generations; when due, everything."""
    full = FullCollections(sys.getallocatedblocks())
    next_look = 0.0
    while True:
        await anyio.sleep(young_period(interval, streams()))
        gc.collect(1)
        now = time.perf_counter()
        if now >= next_look:
            next_look = now + LOOK_EVERY
            if full.due(now, sys.getallocatedblocks()):
                gc.collect()
                full = full.after(now, time.perf_counter(), sys.getallocatedblocks())


@asynccontextmanager
async def collecting(threshold: int, interval: float, streams: Callable[[], int]) -> AsyncIterator[None]:
    """While inside: the youngest threshold at `threshold` allocations (0: Python's)
    and, with an `interval`, the collections above in a task of their own, paced by
    the number of `streams()` open. The process's own thresholds come back at the
    end (a process that embeds the app gets its setting back)."""
    before = gc.get_threshold()
    gc.set_threshold(threshold or before[0], before[1], NEVER if interval else before[2])
    try:
        if not interval:
            yield
            return
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(collect_by_time, interval, streams)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
    finally:
        gc.set_threshold(*before)
