"""The usage ledger on a real PostgreSQL server (tests/postgres_server.py):
two gateway processes writing one table; a replica SIGKILLed mid-stream and
its stream's row written once by another (with Redis); the database stopped and restarted
while streams end (on asyncio and trio); an old 14-column table migrated;
the first row of a stream winning; `python -m asgi_stream usage` reading it;
and the password in no log line and no message."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest

import asgi_stream
from asgi_stream_core.ledger import LEDGER_COLUMNS, UsageLedger, usage_report
from tests import postgres_server as fixtures
from tests.conftest import free_port, serve, stream
from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - a fixture
from tests.replicas import SLOWNESS, chat, gateway_env, kill_owner_while_followed, read_stream, respond, run_replicas
from tests.servers import Process
from tests.test_ledger_batching import row
from tests.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
postgres_cluster, postgres_server = fixtures.postgres_cluster, fixtures.postgres_server
OLD_SCHEMA = (  # the 14 columns, with the types an earlier asgi-stream gave them in SQLite
    "CREATE TABLE usage (stream_id TEXT PRIMARY KEY, key_name TEXT, backend TEXT, model TEXT, started_at TEXT,"
    " time_to_first_token_ms DOUBLE PRECISION, duration_ms DOUBLE PRECISION, prompt_tokens INTEGER, completion_tokens INTEGER,"
    " total_tokens INTEGER, estimated INTEGER, finish_reason TEXT, error_type TEXT, client_disconnected INTEGER)"
)


def wait_until(check: Any, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def ledger_rows(server: PostgresServer, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """`sql`'s rows; none while the ledger has not made its table yet (its thread does at its first write)."""
    try:
        return server.query(sql, *params)
    except psycopg.errors.UndefinedTable:
        return []


def waiting(url: str) -> int:
    line = next(line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith("asgi_stream_ledger_rows_waiting "))
    return int(line.split()[1])


# --- two replicas, one table


def start_replica(url: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "USAGE_DB": url, "ECHO_DELAY_SECONDS": "0", "RESUME_GRACE_SECONDS": "0"}
    with log.open("wb") as output:  # the child keeps its own copy
        process = subprocess.Popen([sys.executable, "-m", "uvicorn", "asgi_stream:app", "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: _answers(base), 30), log.read_text()
    return process, base


def _answers(base: str) -> bool:
    try:
        return httpx.get(base + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_two_replicas_write_their_rows_into_one_table(postgres_server: PostgresServer, tmp_path: Path) -> None:
    replicas = [start_replica(postgres_server.url(), tmp_path / f"replica{i}.log") for i in range(2)]
    try:
        ids = {base: [stream("GET", base + f"/chat/stream?prompt=from+{i}+{n}").headers["x-stream-id"] for n in range(3)]
               for i, (_, base) in enumerate(replicas)}  # fmt: skip
    finally:
        for process, _ in replicas:
            process.send_signal(signal.SIGTERM)  # the lifespan shutdown writes what waits
        for process, _ in replicas:
            assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    rows = postgres_server.query("SELECT stream_id, replica, route, completion_tokens FROM usage")
    assert sorted(r[0] for r in rows) == sorted(i for each in ids.values() for i in each)  # every row, once
    by_replica = {replica: sorted(r[0] for r in rows if r[1] == replica) for replica in {r[1] for r in rows}}
    assert sorted(by_replica.values()) == sorted(sorted(each) for each in ids.values())  # each replica named its own rows
    assert {r[2] for r in rows} == {"chat/stream"} and {r[3] for r in rows} == {3}
    for i in range(2):
        log = (tmp_path / f"replica{i}.log").read_text()
        assert "Application shutdown complete" in log and postgres_server.password not in log


# --- a replica killed mid-stream: another writes its row


def finished_stream(replica: Process) -> str:
    done = read_stream("POST", replica.url + "/chat/stream", json=chat("slow 3 0"), timeout=60 * SLOWNESS)
    assert done.status == 200 and done.of("done") == ["stop"], (done.status, done.events[-2:])
    return done.headers["x-stream-id"]


@pytest.mark.timeout(400)
def test_a_sigkilled_owner_s_stream_gets_one_interrupted_row_from_another_replica(
    postgres_server: PostgresServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Three replicas on one Redis and one table; the owner of a live stream is
    SIGKILLed, so it writes nothing more: a survivor that sees its lease lapse
    writes the stream's row (estimated, `interrupted`), and only one does."""
    lease = 2
    env = {"OWNER_LEASE_SECONDS": str(lease), "USAGE_DB": postgres_server.url()}
    with FakeUpstream(respond) as upstream, run_replicas(
        ["uvicorn", "uvicorn", "hypercorn-trio"], gateway_env(upstream, redis_server.url, **env), tmp_path
    ) as (owner, b, c):  # fmt: skip
        before = {replica.port: finished_stream(replica) for replica in (owner, b, c)}
        # the owner's own rows must be in before it dies: nothing of its queue survives SIGKILL
        assert wait_until(lambda: len(ledger_rows(postgres_server, "SELECT stream_id FROM usage")) == 3, 60), "rows of the first streams"
        # each replica's name in the ledger (host:pid of the process serving, a child of hypercorn's)
        name = {port: postgres_server.query("SELECT replica FROM usage WHERE stream_id = %s", i)[0][0] for port, i in before.items()}
        assert len(set(name.values())) == 3, name
        start = read_stream("POST", owner.url + "/chat/stream", json=chat("forever pg sigkill"), stop_after=2)
        stream_id = start.last_id.rsplit(".", 1)[0]
        read, _ = kill_owner_while_followed(owner, b, start.last_id)
        assert owner.popen.wait(30) == -signal.SIGKILL
        names = [event for event, _, _ in read.events]
        assert names[-2:] == ["error", "done"] and set(names[:-2]) <= {"token"}, names[-5:]
        assert json.loads(read.of("error")[0])["type"] == "interrupted" and read.of("done") == ["error"]
        seen = len(start.tokens) + len(read.tokens)
        after = [finished_stream(replica) for replica in (b, c, b, c)]  # the survivors carry on writing their own rows
        query = "SELECT stream_id, error_type, estimated, completion_tokens, finish_reason, replica FROM usage WHERE stream_id = %s"
        assert wait_until(lambda: postgres_server.query(query, stream_id) != [], 60), "no row for the killed owner's stream"
        everyone = [*before.values(), *after]
        assert wait_until(lambda: len(postgres_server.query("SELECT stream_id FROM usage")) == len(everyone) + 1, 60)
        time.sleep(2 * lease)  # time for a second survivor to write the same stream's row, were it to
        rows = postgres_server.query(query, stream_id)
        assert len(rows) == 1, rows
        _, error_type, estimated, completion_tokens, finish_reason, writer = rows[0]
        assert (error_type, estimated, finish_reason) == ("interrupted", 1, "error"), rows
        assert completion_tokens >= seen >= 3, (completion_tokens, seen)
        assert writer in {name[b.port], name[c.port]}, (writer, name)  # a survivor, not the dead owner
        others = postgres_server.query("SELECT stream_id, finish_reason, error_type, replica FROM usage WHERE stream_id <> %s", stream_id)
        assert sorted(r[0] for r in others) == sorted(everyone)  # every finished stream, once
        assert {(r[1], r[2]) for r in others} == {("stop", None)}
        wrote = Counter(r[3] for r in others)
        assert wrote == {name[owner.port]: 1, name[b.port]: 3, name[c.port]: 3}, (wrote, name)  # each row by the replica that ran it
    logs = {replica.port: replica.log.read_text(errors="replace") for replica in (owner, b, c)}
    for port, log in logs.items():
        assert log.count('"event":"stream_end"') == wrote[name[port]] + (writer == name[port]), (port, log[-2000:])
        assert postgres_server.password not in log, port
    ended = [line for log in logs.values() for line in log.splitlines() if f'"stream_id":"{stream_id}"' in line]
    assert len(ended) == 1 and json.loads(ended[0])["error_type"] == "interrupted", ended  # the survivor's stream_end line


@pytest.mark.timeout(300)
def test_a_sigkilled_owner_s_v1_completion_gets_its_interrupted_row_too(
    postgres_server: PostgresServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The OpenAI-compatible route keeps no events in Redis and no replica may
    resume or cancel it, but its meta holds its token count: when its owner is
    SIGKILLed, the survivor writes its row, on its route."""
    lease = 2
    env = {"OWNER_LEASE_SECONDS": str(lease), "USAGE_DB": postgres_server.url()}
    body = {"model": "openai/gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "forever v1 sigkill"}]}
    with FakeUpstream(respond) as upstream, run_replicas(
        ["uvicorn", "uvicorn"], gateway_env(upstream, redis_server.url, **env), tmp_path
    ) as (owner, survivor):  # fmt: skip
        earlier = finished_stream(survivor)  # its row makes the table
        assert wait_until(lambda: len(ledger_rows(postgres_server, "SELECT stream_id FROM usage")) == 1, 60), "the first row"
        with httpx.Client(timeout=60 * SLOWNESS) as client, client.stream("POST", owner.url + "/v1/chat/completions", json=body) as answer:
            assert answer.status_code == 200
            lines = (json.loads(line[6:]) for line in answer.iter_lines() if line.startswith("data: {"))
            seen = [chunk for chunk, _ in zip(lines, range(6))]
            stream_id = seen[0]["id"].removeprefix("chatcmpl-")
            tokens = sum(1 for chunk in seen if chunk["choices"][0]["delta"].get("content"))
            meta = f"asgi-stream:{stream_id}:meta"
            assert wait_until(lambda: int(redis_server.command("HGET", meta, "tokens").split(b"\r\n")[-2]) >= tokens, 10 * SLOWNESS)
            assert httpx.delete(survivor.url + f"/chat/stream/{stream_id}").status_code == 404  # not cancellable by id elsewhere
            resumed = httpx.get(survivor.url + "/chat/stream", headers={"last-event-id": f"{stream_id}.1"})
            assert resumed.status_code == 204  # nor resumable
            os.killpg(owner.popen.pid, signal.SIGKILL)
        assert owner.popen.wait(30) == -signal.SIGKILL
        query = "SELECT route, error_type, estimated, completion_tokens, finish_reason FROM usage WHERE stream_id = %s"
        assert wait_until(lambda: postgres_server.query(query, stream_id) != [], 60), "no row for the killed owner's completion"
        time.sleep(lease)
        rows = postgres_server.query(query, stream_id)
    assert earlier != stream_id and len(rows) == 1, rows
    assert rows[0][:3] == ("v1/chat/completions", "interrupted", 1) and rows[0][4] == "error", rows
    assert rows[0][3] >= tokens >= 4, (rows, tokens)
    ended = [line for line in survivor.log.read_text().splitlines() if f'"stream_id":"{stream_id}"' in line]
    assert len(ended) == 1 and json.loads(ended[0])["route"] == "v1/chat/completions", ended


# --- the database goes away and comes back


def test_rows_wait_while_the_database_is_down_and_land_when_it_returns(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with serve({"USAGE_DB": postgres_server.url(), "ECHO_DELAY_SECONDS": "0"}) as gw:
        before = [stream("GET", gw.url + "/chat/stream?prompt=before").headers["x-stream-id"] for _ in range(2)]
        assert wait_until(lambda: waiting(gw.url) == 0)
        postgres_server.stop()
        during = []
        for _ in range(5):  # streams end normally while the ledger cannot be written
            result = stream("GET", gw.url + "/chat/stream?prompt=during+the+outage", timeout=20)
            assert result.names[-1] == "done" and result.of("done") == ["stop"]
            during.append(result.headers["x-stream-id"])
        assert wait_until(lambda: waiting(gw.url) == 5)
        assert "usage ledger write failed (postgresql://ledger@127.0.0.1" in caplog.text
        postgres_server.start()
        assert wait_until(lambda: waiting(gw.url) == 0, 60)  # retried with backoff (5 s at most between tries)
        assert "usage ledger written again" in caplog.text
        after = stream("GET", gw.url + "/chat/stream?prompt=after").headers["x-stream-id"]
    assert sorted(r[0] for r in postgres_server.query("SELECT stream_id FROM usage")) == sorted([*before, *during, after])
    assert postgres_server.password not in caplog.text


@pytest.mark.anyio
async def test_an_outage_in_process_on_both_loops_loses_no_row(postgres_server: PostgresServer, anyio_backend: str) -> None:
    gateway = asgi_stream.Gateway({"USAGE_DB": postgres_server.url(), "ECHO_DELAY_SECONDS": "0", "RESUME_GRACE_SECONDS": "0"})
    ids = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gateway", timeout=30) as client:
        ids.append((await client.get("/chat/stream?prompt=one")).headers["x-stream-id"])
        await anyio.to_thread.run_sync(postgres_server.stop)
        with anyio.fail_after(20):  # streams are not held up by the database being away
            for _ in range(3):
                response = await client.get("/chat/stream?prompt=two")
                assert response.text.rstrip().endswith("data: stop")
                ids.append(response.headers["x-stream-id"])
        assert gateway.start().ledger is not None and gateway.start().ledger.waiting >= 3
        await anyio.to_thread.run_sync(postgres_server.start)
    await gateway.aclose()  # waits (bounded) for the rows: the database is back
    assert gateway.start().ledger.waiting == 0
    assert sorted(r[0] for r in postgres_server.query("SELECT stream_id FROM usage")) == sorted(ids)


def test_at_shutdown_with_the_database_down_the_unwritten_rows_are_counted_in_the_log(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    usage = UsageLedger(postgres_server.url())
    postgres_server.stop()
    for i in range(4):
        usage.put(row(i))
    assert usage.close(1.0) == 4
    assert "usage ledger: 4 rows could not be written to postgresql://ledger@127.0.0.1" in caplog.text
    assert postgres_server.password not in caplog.text


# --- schema, exactly once, wrong password


def test_an_old_table_gains_the_new_columns_and_keeps_every_row(postgres_server: PostgresServer) -> None:
    postgres_server.execute(OLD_SCHEMA)
    for i in range(3):
        values = list(row(i).values())
        postgres_server.query(f"INSERT INTO usage VALUES ({', '.join(['%s'] * 14)})", *values)
    usages = [UsageLedger(postgres_server.url()) for _ in range(2)]  # two replicas starting together migrate once
    for n, usage in enumerate(usages):
        usage.put(row(f"new{n}"))
    assert [usage.close() for usage in usages] == [0, 0]
    columns = [r[0] for r in postgres_server.query(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'usage' ORDER BY ordinal_position")]  # fmt: skip
    assert columns == list(LEDGER_COLUMNS)
    rows = postgres_server.query("SELECT stream_id, completion_tokens, route, replica IS NULL FROM usage ORDER BY 1")
    assert rows == [("s0", 2, "chat/stream", True), ("s1", 2, "chat/stream", True), ("s2", 2, "chat/stream", True),
                    ("snew0", 2, "chat/stream", False), ("snew1", 2, "chat/stream", False)]  # fmt: skip


def test_the_first_row_of_a_stream_wins_across_replicas(postgres_server: PostgresServer) -> None:
    owner, survivor = UsageLedger(postgres_server.url()), UsageLedger(postgres_server.url())
    survivor.put(row("x", finish_reason="error", error_type="interrupted", completion_tokens=4, estimated=1))
    assert survivor.close() == 0
    owner.put(row("x", finish_reason="stop", completion_tokens=7))  # the owner's late row changes nothing
    assert owner.close() == 0
    assert postgres_server.query("SELECT error_type, completion_tokens, estimated FROM usage") == [("interrupted", 4, 1)]


def test_a_wrong_password_is_logged_without_any_password(postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    usage = UsageLedger(postgres_server.url(password="wrong-" + postgres_server.password))
    usage.put(row(1))
    assert wait_until(lambda: "usage ledger write failed" in caplog.text, 20)
    assert usage.close(0.2) == 1
    assert "password authentication failed" in caplog.text and postgres_server.password not in caplog.text


# --- the command line


def run_usage(url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asgi_stream", "usage", *argv], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "USAGE_DB": url}, timeout=60)  # fmt: skip


def test_usage_reads_postgres_grouped_and_as_csv(postgres_server: PostgresServer) -> None:
    missing = run_usage(postgres_server.url())
    assert missing.returncode == 1 and "no usage ledger at 'postgresql://ledger@127.0.0.1" in missing.stderr
    usage = UsageLedger(postgres_server.url())
    usage.put(row("a", key_name="alice", started_at="2026-03-01T10:00:00Z"))
    usage.put(row("b", key_name="alice", started_at="2026-03-02T10:00:00Z", prompt_tokens=10, total_tokens=12, estimated=1))
    usage.put(row("c", key_name=None, started_at="2026-03-02T11:00:00Z"))
    assert usage.close() == 0
    table = run_usage(postgres_server.url())
    assert table.returncode == 0, table.stderr
    assert [line.split() for line in table.stdout.splitlines()] == [
        ["key", "backend", "model", "streams", "prompt", "completion", "total", "estimated"],
        ["-", "echo", "echo", "1", "1", "2", "3", "0"], ["alice", "echo", "echo", "2", "11", "4", "15", "1"]]  # fmt: skip
    by_day = run_usage(postgres_server.url(), "--by", "day,key", "--csv")
    assert list(csv.reader(by_day.stdout.splitlines())) == [
        ["day", "key", "streams", "prompt_tokens", "completion_tokens", "total_tokens", "estimated_streams"],
        ["2026-03-01", "alice", "1", "1", "2", "3", "0"], ["2026-03-02", "-", "1", "1", "2", "3", "0"],
        ["2026-03-02", "alice", "1", "10", "2", "12", "1"]]  # fmt: skip
    wrong = run_usage(postgres_server.url(password="not-" + postgres_server.password))
    assert wrong.returncode == 1 and "cannot read the usage ledger at postgresql://ledger@127.0.0.1" in wrong.stderr
    for done in (missing, table, by_day, wrong):
        assert postgres_server.password not in done.stdout + done.stderr


def test_usage_in_process_on_postgres(postgres_server: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_report([], postgres_server.url()) == 1
    assert "no usage ledger at 'postgresql://ledger@127.0.0.1" in capsys.readouterr().err
    usage = UsageLedger(postgres_server.url())
    usage.put(row("a", model="m1"))
    usage.put(row("b", model="m2", estimated=1))
    assert usage.close() == 0
    assert usage.summary(["model"]) == [("m1", 1, 1, 2, 3, 0), ("m2", 1, 1, 2, 3, 1)]
    assert usage_report(["--by", "backend", "--csv"], postgres_server.url()) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["echo,2,2,4,6,1"]
    assert usage_report([], postgres_server.url(password="not-" + postgres_server.password)) == 1
    err = capsys.readouterr().err
    assert "password authentication failed" in err and postgres_server.password not in err
