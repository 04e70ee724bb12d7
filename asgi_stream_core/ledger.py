"""The usage ledger: one row per stream, whatever its ending, for billing and
budgets, in SQLite (USAGE_DB a path) or PostgreSQL (a URL: one table for every
replica). Rows queue in memory and the ledger's own thread writes them in
batches, so a slow or absent database never holds up a stream."""

from __future__ import annotations

import argparse
import collections
import csv
import logging
import os
import re
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("asgi_stream.ledger")

# name -> SQL type, valid in SQLite and PostgreSQL alike. Columns after the
# first 14 were added later: older tables get them by ALTER TABLE at startup.
COLUMN_TYPES = {
    "stream_id": "TEXT PRIMARY KEY", "key_name": "TEXT", "backend": "TEXT", "model": "TEXT", "started_at": "TEXT",
    "time_to_first_token_ms": "DOUBLE PRECISION", "duration_ms": "DOUBLE PRECISION", "prompt_tokens": "BIGINT",
    "completion_tokens": "BIGINT", "total_tokens": "BIGINT", "estimated": "INTEGER", "finish_reason": "TEXT",
    "error_type": "TEXT", "client_disconnected": "INTEGER",
    # every stream before this column came through /chat/stream: the default fills the old rows
    "route": "TEXT DEFAULT 'chat/stream'",
    "replica": "TEXT",  # host:pid of the process that wrote the row; NULL in rows older than the column
    "reasoning_tokens": "BIGINT",  # of completion_tokens, when the provider reported them; else NULL
    # through a model alias (CONFIG_FILE): the target that served and the targets tried; NULL otherwise
    "served_upstream": "TEXT", "served_model": "TEXT", "attempts": "INTEGER",
}  # fmt: skip
LEDGER_COLUMNS = tuple(COLUMN_TYPES)
ADDED_COLUMNS = LEDGER_COLUMNS[14:]

MAX_WAITING_ROWS = 100_000
BATCH_ROWS = 1000  # rows per transaction when many wait (after an outage)
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)  # then 5 s for as long as the database stays away
GATHER_SECONDS = 0.05  # a row waits this long for company before the writer takes it
CLOSE_WAIT_SECONDS = 3.0  # at shutdown, after the streams' rows are queued; the whole budget: tests/test_container.py
GROUPINGS = {"key": "coalesce(key_name, '-')", "backend": "backend", "model": "model", "day": "substr(started_at, 1, 10)"}
POSTGRES_KEYWORD = re.compile(r"\s*(host|hostaddr|port|dbname|user|password|service|sslmode|passfile|options)\s*=")


def is_postgres(target: str) -> bool:
    """A postgresql:// or postgres:// URL, or a libpq key=value string."""
    return target.startswith(("postgresql://", "postgres://")) or bool(POSTGRES_KEYWORD.match(target))


def target_problem(target: str) -> str | None:
    """Why USAGE_DB cannot be used, without repeating it (it may hold a password); None if it can."""
    if not target or not is_postgres(target):
        return None
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return "a PostgreSQL ledger needs psycopg: pip install 'asgi-stream[postgres]'"
    try:
        conninfo_to_dict(target)
    except Exception:  # psycopg's message may quote the string
        return "is not a valid PostgreSQL URL or connection string"
    return None


class Store(Protocol):
    shown: str  # where the rows go, fit for a log line (no password)

    def insert(self, rows: Sequence[Sequence[Any]]) -> None: ...
    def exists(self) -> bool: ...
    def query(self, sql: str) -> list[tuple[Any, ...]]: ...
    def reset(self) -> None: ...
    def scrub(self, text: str) -> str: ...
    def is_outage(self, exc: Exception) -> bool: ...


def insert_statement(placeholder: str) -> str:
    # The first row written for a stream wins: see docs/ledger.md, "Exactly once".
    values = ", ".join([placeholder] * len(LEDGER_COLUMNS))
    return f"INSERT INTO usage ({', '.join(LEDGER_COLUMNS)}) VALUES ({values}) ON CONFLICT (stream_id) DO NOTHING"  # noqa: S608


def create_statement() -> str:
    return f"CREATE TABLE IF NOT EXISTS usage ({', '.join(f'{n} {t}' for n, t in COLUMN_TYPES.items())})"


def missing_columns(present: set[str]) -> list[str]:
    return [f"ALTER TABLE usage ADD COLUMN {name} {COLUMN_TYPES[name]}" for name in ADDED_COLUMNS if name not in present]


class SqliteStore:
    def __init__(self, path: str):
        self.path = self.shown = path
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # WAL: no fsync per row (98 -> 11 us CPU); survives a crash, not a power cut
                db.execute("BEGIN IMMEDIATE")  # one process migrates at a time
                with db:
                    present = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
                    for statement in missing_columns(present) if present else [create_statement()]:
                        db.execute(statement)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def insert(self, rows: Sequence[Sequence[Any]]) -> None:
        db = self._connect()
        db.execute("BEGIN")
        with db:  # commits, or rolls back on an error
            db.executemany(insert_statement("?"), rows)

    def exists(self) -> bool:
        if not Path(self.path).exists():
            return False
        with sqlite3.connect(self.path) as db:
            return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'usage'").fetchone() is not None

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(self.path)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    def reset(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def scrub(self, text: str) -> str:
        return text

    def is_outage(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.OperationalError)  # cannot open, locked, disk full: worth a retry


class PostgresStore:
    """psycopg 3, synchronous: only the ledger's thread (and the CLI) call it."""

    def __init__(self, target: str):
        from psycopg.conninfo import conninfo_to_dict

        self.params: dict[str, Any] = {
            "connect_timeout": 5, "tcp_user_timeout": 10_000,  # ms: a write to a host gone silent fails, not hangs
            "application_name": "asgi-stream", **conninfo_to_dict(target),
        }  # fmt: skip
        self._secret = str(self.params.get("password") or "")
        p = self.params
        self.shown = f"postgresql://{p.get('user', '')}@{p.get('host', '')}:{p.get('port', 5432)}/{p.get('dbname', '')}"
        self._db: Any = None

    def _connect(self) -> Any:
        import psycopg

        if self._db is None:
            db = psycopg.connect(**self.params, autocommit=True)
            try:
                with db.transaction():
                    db.execute("SELECT pg_advisory_xact_lock(7411)")  # replicas starting together migrate one at a time
                    present = {row[0] for row in db.execute(
                        "SELECT column_name FROM information_schema.columns WHERE table_name = 'usage' AND table_schema = current_schema()"
                    )}  # fmt: skip
                    for statement in missing_columns(present) if present else [create_statement()]:
                        db.execute(statement)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def insert(self, rows: Sequence[Sequence[Any]]) -> None:
        db = self._connect()
        with db.transaction(), db.cursor() as cursor:
            cursor.executemany(insert_statement("%s"), rows)

    def exists(self) -> bool:
        return bool(self.query("SELECT 1 FROM information_schema.tables WHERE table_name = 'usage' AND table_schema = current_schema()"))

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(**self.params) as db:
            return list(db.execute(sql).fetchall())

    def reset(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def scrub(self, text: str) -> str:
        return text.replace(self._secret, "[redacted]") if self._secret else text

    def is_outage(self, exc: Exception) -> bool:
        import psycopg

        return isinstance(exc, psycopg.OperationalError)  # unreachable, restarting, connection lost: worth a retry


def reason(store: Store, exc: Exception) -> str:
    """The error on one line, without the password."""
    return f"{type(exc).__name__}: {' '.join(store.scrub(str(exc)).split())}"


def open_store(target: str) -> Store:
    return PostgresStore(target) if is_postgres(target) else SqliteStore(target)


def this_replica() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class UsageLedger:
    """Rows wait in a bounded queue; one thread of the ledger's own writes
    them, a batch at a time, retrying with backoff while the database is away.
    `add` only queues, so a stream's ending never waits on the database."""

    def __init__(self, target: str, max_waiting: int = MAX_WAITING_ROWS):
        self.store = open_store(target)
        self.max_waiting = max_waiting
        self.replica = this_replica()
        self.dropped = 0  # rows given up: max_waiting rows were already waiting, or the database refused the row
        self.written = 0  # rows committed (a stream's second row counts too, though it changed nothing)
        self._rows: collections.deque[dict[str, Any]] = collections.deque()
        self._in_flight = 0  # rows taken by the writer and not yet committed
        self._wake = threading.Event()  # a row was queued, or close() began
        self._retry_now = threading.Event()  # close() began: cut the backoff short
        self._closing_at: float | None = None  # monotonic deadline once close() began
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # starting and stopping the thread

    @property
    def waiting(self) -> int:
        """Rows queued or being written, not yet committed."""
        return len(self._rows) + self._in_flight

    async def add(self, row: dict[str, Any]) -> None:
        """Queue `row` for writing; never waits for the database (async for the callers' sake)."""
        self.put(row)

    def put(self, row: dict[str, Any]) -> None:
        if self.waiting >= self.max_waiting:
            # The newest row is the one refused: what is kept is everything up to
            # a moment, so the gap is "from the first such line on", and each
            # missing row is in the stream_end log line of the same stream.
            self.dropped += 1
            log.error("usage ledger full: %d rows wait for %s; the row of stream %s is dropped (its stream_end log line has it)",
                      self.waiting, self.store.shown, row.get("stream_id"))  # fmt: skip
            return
        self._rows.append(row)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._write_forever, name="usage-ledger", daemon=True)
                    self._thread.start()
        self._wake.set()

    def write(self, row: dict[str, Any]) -> None:
        """Write one row now, in the calling thread (tools and tests)."""
        self.store.insert([self._values(row)])

    def _values(self, row: dict[str, Any]) -> list[Any]:
        defaults = {"route": "chat/stream", "replica": self.replica}  # a column a row lacks is NULL, never a failure
        return [row.get(column, defaults.get(column)) for column in LEDGER_COLUMNS]

    def _write_one_by_one(self, batch: list[dict[str, Any]]) -> None:
        """A batch failed with the database there: find the rows it refuses,
        drop only those (logged), so one bad row never blocks the others."""
        kept = []
        for row in batch:
            try:
                self.store.insert([self._values(row)])
                self.written += 1
            except Exception as exc:
                if self.store.is_outage(exc):
                    kept.append(row)
                    continue
                self.dropped += 1
                log.error("usage ledger refused the row of stream %s (dropped): %s", row.get("stream_id"), reason(self.store, exc))
        self._rows.extendleft(reversed(kept))

    def _write_forever(self) -> None:
        failures = 0
        failing_since = 0.0
        while True:
            self._wake.clear()
            if not self._rows:
                if self._closing_at is not None:
                    return
                self._wake.wait()
                # Let the rows of streams ending about together arrive: one transaction
                # for all of them costs the thread (and the GIL it shares with the loop) less.
                self._retry_now.wait(GATHER_SECONDS)
                continue
            batch = [self._rows.popleft() for _ in range(min(BATCH_ROWS, len(self._rows)))]
            self._in_flight = len(batch)
            try:
                self.store.insert([self._values(row) for row in batch])
            except Exception as exc:  # the thread must outlive any failure: the rows wait for the next try
                self.store.reset()
                if not self.store.is_outage(exc):
                    self._write_one_by_one(batch)
                    self._in_flight = 0
                    continue
                self._rows.extendleft(reversed(batch))
                self._in_flight = 0
                if not failures:
                    failing_since = time.monotonic()
                    log.error("usage ledger write failed (%s): %s; %d rows wait, retrying",
                              self.store.shown, reason(self.store, exc), self.waiting)  # fmt: skip
                delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
                failures += 1
                if self._closing_at is not None:
                    delay = min(delay, self._closing_at - time.monotonic())
                    if delay <= 0:
                        return
                self._retry_now.wait(delay)
                continue
            self._in_flight = 0
            self.written += len(batch)
            if failures:
                log.warning("usage ledger written again (%s) after %.1f s and %d failed tries; %d rows wait",
                            self.store.shown, time.monotonic() - failing_since, failures, self.waiting)  # fmt: skip
                failures = 0

    def close(self, timeout: float = CLOSE_WAIT_SECONDS) -> int:
        """Write what waits, for at most `timeout` seconds; log and return how
        many rows could not be written. A later add() starts a new writer."""
        with self._lock:
            thread = self._thread
            if thread is not None:
                self._closing_at = time.monotonic() + timeout
                self._retry_now.set()
                self._wake.set()
                thread.join(timeout + 0.5)  # the writer gives up at the deadline; the extra is for a write under way
            left = self.waiting
            if left:
                log.error("usage ledger: %d rows could not be written to %s at shutdown (their stream_end log lines hold them)",
                          left, self.store.shown)  # fmt: skip
            if thread is None or not thread.is_alive():
                self.store.reset()
                self._thread, self._closing_at = None, None
                self._retry_now.clear()
            return left

    @property
    def closed(self) -> bool:
        return self._thread is None

    def metrics(self) -> bytes:
        """Prometheus families for /metrics."""
        return (
            "# HELP asgi_stream_ledger_rows_waiting Usage rows not yet written to the ledger.\n"
            "# TYPE asgi_stream_ledger_rows_waiting gauge\n"
            f"asgi_stream_ledger_rows_waiting {self.waiting}\n"
            "# HELP asgi_stream_ledger_rows_dropped_total Usage rows dropped: too many were waiting, or the database refused the row.\n"
            "# TYPE asgi_stream_ledger_rows_dropped_total counter\n"
            f"asgi_stream_ledger_rows_dropped_total {self.dropped}\n"
        ).encode()

    def summary(self, by: Sequence[str] = ("key", "backend", "model")) -> list[tuple[Any, ...]]:
        return summarize(self.store, by)


def summarize(store: Store, by: Sequence[str]) -> list[tuple[Any, ...]]:
    """Streams and token sums per group, sorted the same way whatever the store's collation."""
    groups = ", ".join(GROUPINGS[name] for name in by)
    positions = ", ".join(str(i + 1) for i in range(len(by)))
    sums = ", ".join(f"CAST(sum({c}) AS BIGINT)" for c in ("prompt_tokens", "completion_tokens", "total_tokens", "estimated"))
    rows = store.query(f"SELECT {groups}, count(*), {sums} FROM usage GROUP BY {positions}")  # noqa: S608 - names from GROUPINGS only
    return sorted(rows, key=lambda row: tuple(str(value) for value in row[: len(by)]))


# --- `python -m asgi_stream usage` -------------------------------------------------

WIDTHS = {"key": 16, "backend": 10, "model": 28, "day": 10}


def grouping(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUPINGS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--by takes distinct names from {','.join(GROUPINGS)}, not {text!r}")
    return names


def usage_report(argv: list[str], target: str) -> int:
    """Sum the ledger per key, backend and model (or --by any of key,backend,model,day); --csv for spreadsheets."""
    parser = argparse.ArgumentParser(prog="python -m asgi_stream usage", description=usage_report.__doc__)
    parser.add_argument("--by", type=grouping, default=["key", "backend", "model"], help="key,backend,model,day (any of them)")
    parser.add_argument("--csv", action="store_true", help="comma-separated values with a header line")
    args = parser.parse_args(argv)
    if not target or target_problem(target):
        print(f"no usage ledger at {target!r}" if not target else f"USAGE_DB {target_problem(target)}", file=sys.stderr)
        return 1
    store = open_store(target)
    try:
        if not store.exists():
            print(f"no usage ledger at {store.shown!r}", file=sys.stderr)
            return 1
        rows = summarize(store, args.by)
    except Exception as exc:
        print(f"cannot read the usage ledger at {store.shown}: {reason(store, exc)}", file=sys.stderr)
        return 1
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([*args.by, "streams", "prompt_tokens", "completion_tokens", "total_tokens", "estimated_streams"])
        writer.writerows(rows)
        return 0
    row_format = " ".join([*(f"{{:<{WIDTHS[name]}}}" for name in args.by), "{:>8} {:>10} {:>11} {:>10} {:>9}"])
    print(row_format.format(*args.by, "streams", "prompt", "completion", "total", "estimated"))
    for row in rows:
        print(row_format.format(*row))
    return 0
