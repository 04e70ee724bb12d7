"""The ledger's queue and writer thread, on SQLite: rows of streams that end
together go in few batches; add() never waits for the database; the first row
of a stream wins; the queue is bounded (the newest row is the one dropped);
a row the database refuses is dropped alone; an old 14-column ledger is
migrated in place; `python -m asgi_stream usage --by ... --csv`."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import asgi_stream
from asgi_stream_core import config, ledger
from asgi_stream_core.ledger import LEDGER_COLUMNS, UsageLedger, usage_report

OLD_SCHEMA = (  # asgi-stream's ledger before the route and replica columns, as it created it
    "CREATE TABLE IF NOT EXISTS usage (stream_id TEXT PRIMARY KEY, key_name TEXT, backend TEXT,"
    " model TEXT, started_at TEXT, time_to_first_token_ms REAL, duration_ms REAL,"
    " prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER, estimated INTEGER,"
    " finish_reason TEXT, error_type TEXT, client_disconnected INTEGER)"
)


def row(i: int | str, **fields: Any) -> dict[str, Any]:
    base = {column: None for column in LEDGER_COLUMNS[:14]}
    return base | {"stream_id": f"s{i}", "backend": "echo", "model": "echo", "started_at": "2026-03-01T10:00:00Z",
                   "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "estimated": 0} | fields  # fmt: skip


def stored(path: Path, sql: str = "SELECT stream_id FROM usage ORDER BY stream_id") -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


@pytest.mark.anyio
async def test_rows_added_together_are_written_in_few_batches_and_all_land(tmp_path: Path) -> None:
    usage = UsageLedger(str(tmp_path / "usage.db"))
    batches: list[int] = []
    insert = usage.store.insert
    usage.store.insert = lambda rows: (batches.append(len(rows)), insert(rows))[1]  # type: ignore[method-assign]
    async with anyio.create_task_group() as tasks:
        for i in range(50):
            tasks.start_soon(usage.add, row(f"{i:02d}"))
    assert await anyio.to_thread.run_sync(usage.close) == 0
    assert sum(batches) == 50 and len(batches) <= 10  # not a transaction per row
    assert stored(tmp_path / "usage.db") == [(f"s{i:02d}",) for i in range(50)]


@pytest.mark.anyio
async def test_add_returns_at_once_while_the_database_hangs(tmp_path: Path) -> None:
    usage = UsageLedger(str(tmp_path / "usage.db"))
    release = threading.Event()
    insert = usage.store.insert

    def hanging_insert(rows: Any) -> None:
        release.wait(30)
        insert(rows)

    usage.store.insert = hanging_insert  # type: ignore[method-assign]
    with anyio.fail_after(5):  # each add() would take 30 s if it waited for its row
        for i in range(10):
            await usage.add(row(i))
    assert usage.waiting == 10
    release.set()
    assert await anyio.to_thread.run_sync(usage.close) == 0
    assert len(stored(tmp_path / "usage.db")) == 10 and usage.waiting == 0


def test_the_first_row_of_a_stream_wins(tmp_path: Path) -> None:
    usage = UsageLedger(str(tmp_path / "usage.db"))
    usage.put(row(1, error_type="interrupted", completion_tokens=5, estimated=1))
    assert usage.close() == 0
    usage.put(row(1, finish_reason="stop", completion_tokens=9))  # a late second row for the same stream
    usage.put(row(2))
    assert usage.close() == 0
    assert stored(tmp_path / "usage.db", "SELECT stream_id, error_type, completion_tokens FROM usage ORDER BY 1") == [
        ("s1", "interrupted", 5), ("s2", None, 2)]  # fmt: skip


def test_rows_past_the_limit_are_dropped_newest_first_logged_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    usage = UsageLedger(str(tmp_path), max_waiting=3)  # a directory: every write fails, rows wait
    for i in range(5):
        usage.put(row(i))
    assert usage.waiting == 3 and usage.dropped == 2
    assert "the row of stream s3 is dropped" in caplog.text and "the row of stream s4 is dropped" in caplog.text
    assert "s0 is dropped" not in caplog.text
    text = usage.metrics().decode()
    assert "asgi_stream_ledger_rows_waiting 3\n" in text and "asgi_stream_ledger_rows_dropped_total 2\n" in text
    assert usage.close(0.3) == 3
    assert "usage ledger: 3 rows could not be written" in caplog.text


def test_a_row_the_database_refuses_is_dropped_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    usage = UsageLedger(str(tmp_path / "usage.db"))
    gate = threading.Event()
    insert = usage.store.insert

    def gated_insert(rows: Any) -> None:
        gate.wait(30)
        insert(rows)

    usage.store.insert = gated_insert  # type: ignore[method-assign]
    usage.put(row("first"))  # the writer takes it and waits at the gate: the next three make one batch
    usage.put(row("good1"))
    usage.put(row("bad", model={"not": "bindable"}))
    usage.put(row("good2"))
    gate.set()
    assert usage.close() == 0
    assert stored(tmp_path / "usage.db") == [("sfirst",), ("sgood1",), ("sgood2",)]
    assert usage.dropped == 1 and "refused the row of stream sbad" in caplog.text


def test_an_old_ledger_gains_the_new_columns_and_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(OLD_SCHEMA)
        db.executemany(f"INSERT INTO usage VALUES ({', '.join('?' * 14)})", [list(row(i).values()) for i in range(3)])
    usage = UsageLedger(str(path))
    usage.put(row("new", route="v1/chat/completions"))
    assert usage.close() == 0
    with sqlite3.connect(path) as db:
        columns = [r[1] for r in db.execute("PRAGMA table_info(usage)")]
        rows = db.execute("SELECT stream_id, completion_tokens, route, replica FROM usage ORDER BY stream_id").fetchall()
    assert columns == list(LEDGER_COLUMNS)
    assert rows[:3] == [("s0", 2, "chat/stream", None), ("s1", 2, "chat/stream", None), ("s2", 2, "chat/stream", None)]
    assert rows[3][:3] == ("snew", 2, "v1/chat/completions") and rows[3][3] == usage.replica
    UsageLedger(str(path)).close()  # a second start finds nothing to add
    assert len(stored(path)) == 4


def make_ledger(path: Path) -> None:
    usage = UsageLedger(str(path))
    usage.write(row("a", key_name="alice", model="m1", started_at="2026-03-01T10:00:00Z", prompt_tokens=1, completion_tokens=2,
                    total_tokens=3))  # fmt: skip
    usage.write(row("b", key_name="alice", model="m2", started_at="2026-03-02T10:00:00Z", prompt_tokens=10, completion_tokens=20,
                    total_tokens=30, estimated=1))  # fmt: skip
    usage.write(row("c", key_name=None, model="m1", started_at="2026-03-02T23:59:59Z", prompt_tokens=100, completion_tokens=200,
                    total_tokens=300))  # fmt: skip


def report(capsys: pytest.CaptureFixture[str], target: str, *argv: str) -> tuple[int, list[str], str]:
    code = usage_report(list(argv), target)
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_usage_groups_by_any_of_key_backend_model_day(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_ledger(tmp_path / "u.db")
    code, lines, _ = report(capsys, str(tmp_path / "u.db"), "--by", "day")
    assert code == 0 and [line.split() for line in lines] == [
        ["day", "streams", "prompt", "completion", "total", "estimated"],
        ["2026-03-01", "1", "1", "2", "3", "0"], ["2026-03-02", "2", "110", "220", "330", "1"]]  # fmt: skip
    code, lines, _ = report(capsys, str(tmp_path / "u.db"), "--by", "model,key")
    assert [line.split()[:3] for line in lines[1:]] == [["m1", "-", "1"], ["m1", "alice", "1"], ["m2", "alice", "1"]]


def test_usage_csv_is_read_back_by_a_csv_reader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import csv

    make_ledger(tmp_path / "u.db")
    code, lines, _ = report(capsys, str(tmp_path / "u.db"), "--csv", "--by", "key,day")
    assert code == 0
    assert list(csv.reader(lines)) == [
        ["key", "day", "streams", "prompt_tokens", "completion_tokens", "total_tokens", "estimated_streams"],
        ["-", "2026-03-02", "1", "100", "200", "300", "0"],
        ["alice", "2026-03-01", "1", "1", "2", "3", "0"], ["alice", "2026-03-02", "1", "10", "20", "30", "1"]]  # fmt: skip


@pytest.mark.parametrize("by", ["week", "key,key", ",", "key,,bogus"])
def test_usage_refuses_an_unknown_grouping(tmp_path: Path, capsys: pytest.CaptureFixture[str], by: str) -> None:
    make_ledger(tmp_path / "u.db")
    with pytest.raises(SystemExit) as exit:
        usage_report(["--by", by], str(tmp_path / "u.db"))
    assert exit.value.code == 2 and "--by takes distinct names from key,backend,model,day" in capsys.readouterr().err


def test_main_hands_usage_and_its_options_to_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    make_ledger(tmp_path / "u.db")
    monkeypatch.setenv("USAGE_DB", str(tmp_path / "u.db"))
    assert asgi_stream.main(["asgi_stream", "usage", "--by", "backend", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "echo,3,111,222,333,1"


def test_a_postgres_url_without_psycopg_is_refused_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "psycopg.conninfo", None)  # as if the extra were not installed
    with pytest.raises(config.ConfigError, match=r"pip install 'asgi-stream\[postgres\]'") as refused:
        config.load_config({"USAGE_DB": "postgresql://u:hunter2@db/x"})
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("target", ["postgresql://u:hunter2@db/x?bogus=1", "host=db password=hunter2 bogus=1"])
def test_an_invalid_postgres_target_is_refused_without_repeating_it(target: str) -> None:
    with pytest.raises(config.ConfigError) as refused:
        config.load_config({"USAGE_DB": target})
    assert str(refused.value) == "USAGE_DB is not a valid PostgreSQL URL or connection string"


@pytest.mark.parametrize(("target", "postgres"), [
    ("postgresql://u@h/db", True), ("postgres://h", True), ("host=h dbname=x", True), (" dbname = x", True),
    ("usage.db", False), ("/data/usage.db", False), ("./postgres://x", False), ("my=file.db", False)])  # fmt: skip
def test_which_targets_are_postgres(target: str, postgres: bool) -> None:
    assert ledger.is_postgres(target) is postgres


def test_a_write_hanging_past_the_close_deadline_is_reported_and_finished_by_a_later_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    usage = UsageLedger(str(tmp_path / "usage.db"))
    gate = threading.Event()
    insert = usage.store.insert

    def hanging_insert(rows: Any) -> None:
        gate.wait(30)
        insert(rows)

    usage.store.insert = hanging_insert  # type: ignore[method-assign]
    usage.put(row(1))
    assert usage.close(0.1) == 1 and not usage.closed  # the writer is still inside its write
    assert "usage ledger: 1 rows could not be written" in caplog.text
    gate.set()
    assert usage.close() == 0 and usage.closed
    assert stored(tmp_path / "usage.db") == [("s1",)]


def test_usage_names_an_unusable_postgres_target_without_repeating_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_report([], "postgresql://u:hunter2@db/x?bogus=1") == 1
    err = capsys.readouterr().err
    assert err == "USAGE_DB is not a valid PostgreSQL URL or connection string\n"
