"""The usage ledger: one row per stream, whatever its ending, for billing and
budgets. The database calls block, so they run in a worker thread."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import anyio

LEDGER_COLUMNS = (
    "stream_id", "key_name", "backend", "model", "started_at", "time_to_first_token_ms", "duration_ms",
    "prompt_tokens", "completion_tokens", "total_tokens", "estimated", "finish_reason", "error_type",
    "client_disconnected",
)  # fmt: skip


class UsageLedger:
    """One SQLite row per stream. sqlite3 blocks, so every call runs in a
    worker thread; one connection, serialized by a lock."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._queued: list[dict[str, Any]] = []
        self._queued_in: anyio.Event | None = None  # set once the queued rows are written
        self._writing = False

    async def add(self, row: dict[str, Any]) -> None:
        """Write `row`; rows of streams that end together go in one thread hop
        and one transaction. A hop per row made the worker thread and the
        event loop trade the GIL: +10 ms on cancels when 20 streams ended at once."""
        if self._queued_in is None:
            self._queued_in = anyio.Event()
        self._queued.append(row)
        if self._writing:  # the writer at work takes this row in its next batch
            return await self._queued_in.wait()
        self._writing = True
        try:
            while self._queued:
                rows, written = self._queued, self._queued_in
                self._queued, self._queued_in = [], None
                assert written is not None  # made with the first queued row
                try:
                    await anyio.to_thread.run_sync(self.write_many, rows)
                finally:
                    written.set()
        finally:
            self._writing = False

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: no fsync per row (98 -> 11 us CPU); survives a crash, not a power cut
            db.execute(
                "CREATE TABLE IF NOT EXISTS usage (stream_id TEXT PRIMARY KEY, key_name TEXT, backend TEXT,"
                " model TEXT, started_at TEXT, time_to_first_token_ms REAL, duration_ms REAL,"
                " prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER, estimated INTEGER,"
                " finish_reason TEXT, error_type TEXT, client_disconnected INTEGER)"
            )
            self._db = db
        return self._db

    def write(self, row: dict[str, Any]) -> None:
        self.write_many([row])

    def write_many(self, rows: list[dict[str, Any]]) -> None:
        with self._lock, self._connect() as db:  # commits (or rolls back) at the end
            db.execute("BEGIN")
            db.executemany(
                f"INSERT OR REPLACE INTO usage VALUES ({', '.join('?' * len(LEDGER_COLUMNS))})",  # noqa: S608 - placeholders only
                [[row[c] for c in LEDGER_COLUMNS] for row in rows],
            )

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def summary(self) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._connect().execute(
                "SELECT coalesce(key_name, '-'), backend, model, count(*), sum(prompt_tokens),"
                " sum(completion_tokens), sum(total_tokens), sum(estimated) FROM usage"
                " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
            ).fetchall()
