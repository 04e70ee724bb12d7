"""Ledger rows of streams that end together are written in one batch, and
every add() returns only once its own row is in."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from ledger import LEDGER_COLUMNS, UsageLedger


def row(i: int) -> dict[str, Any]:
    return {column: None for column in LEDGER_COLUMNS} | {"stream_id": f"s{i}", "backend": "echo", "model": "echo"}


@pytest.mark.anyio
async def test_rows_added_together_are_written_in_few_batches_and_all_land(tmp_path: Path) -> None:
    ledger = UsageLedger(str(tmp_path / "usage.db"))
    batches: list[int] = []
    write_many = ledger.write_many
    ledger.write_many = lambda rows: (batches.append(len(rows)), write_many(rows))[1]  # type: ignore[method-assign]
    landed: list[int] = []

    async def add(i: int) -> None:
        await ledger.add(row(i))
        stored = sqlite3.connect(tmp_path / "usage.db").execute("SELECT 1 FROM usage WHERE stream_id = ?", [f"s{i}"]).fetchall()
        landed.append(len(stored))

    async with anyio.create_task_group() as tasks:
        for i in range(50):
            tasks.start_soon(add, i)
    ledger.close()
    assert sum(batches) == 50 and len(batches) <= 3  # the first row alone, then the rest together
    assert landed == [1] * 50  # each add() returned after its row was committed
