"""Python's cyclic garbage collector, run less often while the gateway serves
(GC_THRESHOLD). Issue 25: with thousands of streams held open, the collector
was the one cost per held stream that grew with their number.

CPython collects its youngest objects after every 700 net allocations in the
whole process, and a held stream leaves about 16 objects alive between two
upstream keep-alives (httpx's, httpcore's and anyio's per-read objects:
coroutines, a cancel scope, a future): with 5,000 streams nearly all of them
are examined and promoted, and older collections follow, each walking the
~274 tracked objects of every stream. Measured (bench/held_cost.py, in
process, 45 s holding): collection 1.1 us per stream per second of 28.3 at
1,000 streams, 7.5 of 38.2 at 5,000. With the youngest threshold at 10,000
(shared harness, `held`, 5,000 streams, hold 30): 28.2 and 28.2 us per stream
per second against 30.2 and 38.4, and a new stream's first token p99 while
they are held 6.0 and 4.9 ms against 21.3 and 66.2 (a collection pauses
every stream). The cost: cyclic garbage waits for up to 10,000 allocations
instead of 700 before it is freed; memory freed by reference counting, most
of it, is not affected.

The threshold is the process's, so it is set for the lifespan and given back
at its end (a process that embeds the app gets its own setting back).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["youngest_threshold"]


@contextmanager
def youngest_threshold(allocations: int) -> Iterator[None]:
    """The collector's youngest-generation threshold at `allocations` while inside
    (0: Python's own, untouched); the older generations' thresholds are kept."""
    if not allocations:
        yield
        return
    before = gc.get_threshold()
    gc.set_threshold(allocations, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
