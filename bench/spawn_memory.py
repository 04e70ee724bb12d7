"""What one task costs in memory, by the way it is started: a bare coroutine,
a cancel scope, an anyio task group with and without a task in it, and
asyncio's own `create_task`. N outer tasks each do one of these and wait;
tracemalloc counts what they hold.

    python bench/spawn_memory.py
    PYTHONPATH=DIR python bench/spawn_memory.py    # another anyio, unpacked in DIR

Issue 25: anyio 4.14 gave every spawned task a `TaskHandle` (with a cancel
scope of its own, an `Event` and a wrapper coroutine); with anyio 4.13 a task
group and its task held 3,399 B here, with 4.16 5,256 B, asyncio's
`create_task` 899 B (all beyond the outer task's own 776 B). The gateway
spawns two tasks per stream (docs/benchmarks.md, "Issue 25").
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

N = 2000


async def bare(future: asyncio.Future[None]) -> None:
    await future


async def scope(future: asyncio.Future[None]) -> None:
    with anyio.CancelScope():
        await future


async def task_group(future: asyncio.Future[None]) -> None:
    async with anyio.create_task_group():
        await future


async def task_group_and_task(future: asyncio.Future[None]) -> None:
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(bare, future)
        await future


async def asyncio_task(future: asyncio.Future[None]) -> None:
    task = asyncio.get_running_loop().create_task(bare(future))
    await future
    await task


async def held(kind: Callable[[asyncio.Future[None]], Coroutine[Any, Any, None]]) -> float:
    """Bytes per outer task while N of them wait in `kind`."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(N)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    outer = [loop.create_task(kind(future)) for future in futures]
    for _ in range(5):
        await asyncio.sleep(0)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    for future in futures:
        future.set_result(None)
    await asyncio.gather(*outer)
    return grown / N


async def main() -> None:
    print(f"anyio from {anyio.__file__}")
    for kind in (bare, scope, task_group, asyncio_task, task_group_and_task):
        print(f"  {kind.__name__:20} {await held(kind):6.0f} B per outer task")


if __name__ == "__main__":
    asyncio.run(main())
