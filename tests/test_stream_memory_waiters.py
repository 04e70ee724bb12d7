"""A record's waiters (record.Change): on asyncio a bare future each, made for
the memory of an open stream (bench/stream_memory.py); elsewhere an
anyio.Event. Both must behave as anyio.Event did: a change wakes every task
waiting for it, once; a waiter cancelled (its client gone) wakes no other
and is not woken; a task that waits after a change waits for the next."""

from __future__ import annotations

import anyio
import pytest

from asgi_stream_core.record import Change, StreamRecord
from providers import ChatRequest

pytestmark = pytest.mark.anyio

REQUEST = ChatRequest([{"role": "user", "content": "hi"}], "echo", "echo", 16)


async def test_a_change_wakes_every_task_waiting_for_it_once() -> None:
    change, woken = Change(), []

    async def waiter(n: int) -> None:
        await change.wait()
        woken.append(n)

    async with anyio.create_task_group() as tasks:
        for n in range(3):
            tasks.start_soon(waiter, n)
        await anyio.wait_all_tasks_blocked()
        assert woken == []
        change.set()
        change.set()  # a second set wakes nobody twice
    assert sorted(woken) == [0, 1, 2]


async def test_a_cancelled_waiter_leaves_the_others_waiting_and_is_not_woken() -> None:
    change, woken = Change(), []
    scopes = {"leaving": anyio.CancelScope(), "staying": anyio.CancelScope()}

    async def waiter(name: str) -> None:
        with scopes[name]:
            await change.wait()
            woken.append(name)

    async with anyio.create_task_group() as tasks:
        for name in scopes:  # trio runs them in any order
            tasks.start_soon(waiter, name)
        await anyio.wait_all_tasks_blocked()
        scopes["leaving"].cancel()
        await anyio.wait_all_tasks_blocked()
        assert woken == [] and scopes["leaving"].cancelled_caught
        change.set()
    assert woken == ["staying"] and not scopes["staying"].cancelled_caught


async def test_a_waiter_cancelled_in_the_loop_turn_of_the_change_leaves_the_other_woken() -> None:
    """The change and a cancel in the same loop turn: the cancelled waiter ends either way, the other is woken."""
    change, woken = Change(), []

    async def waiter(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            await change.wait()
            woken.append(name)

    leaving = anyio.CancelScope()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(waiter, "leaving", leaving)
        tasks.start_soon(waiter, "staying", anyio.CancelScope())
        await anyio.wait_all_tasks_blocked()
        leaving.cancel()
        change.set()
    assert "staying" in woken


async def test_a_record_wakes_its_waiters_at_each_append_and_at_the_end() -> None:
    record, seen = StreamRecord("s", None, REQUEST, 1 << 20), []

    async def reader() -> None:
        position = 0
        while not record.finished:
            await record.wait()
            seen.append(record.count - position)
            position = record.count

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(reader)
        tasks.start_soon(reader)
        for token in ("a", "b"):
            await anyio.wait_all_tasks_blocked()
            record.append("token", token)
        await anyio.wait_all_tasks_blocked()
        record.finish("stop", None, None)
    assert seen == [1, 1, 1, 1, 1, 1]  # each reader: one event at a time (a, b, done)


async def test_the_resume_grace_hears_a_reader_come_and_go() -> None:
    record, heard = StreamRecord("s", None, REQUEST, 1 << 20), []

    async def grace() -> None:
        for _ in range(2):
            await record.wait_readers()
            heard.append(record.readers)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(grace)
        await anyio.wait_all_tasks_blocked()
        record.notify()  # an append's wake-up is not a reader's
        await anyio.wait_all_tasks_blocked()
        assert heard == []
        record.readers += 1
        record.readers_changed()
        await anyio.wait_all_tasks_blocked()
        record.readers -= 1
        record.readers_changed()
    assert heard == [1, 0]
