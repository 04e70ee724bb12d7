"""`WORKERS=N python -m asgi_stream`: a worker process per socket, each socket
listening on the one port with SO_REUSEPORT (asgi_stream_core/workers.py). Real
processes on 127.0.0.1: open streams are served by both workers; SIGTERM ends
every worker and the command with 0; a worker that dies stops the others and
the command ends with 1. In process, for coverage: supervise() with stand-in
workers, and a signal that arrives before they started."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.context
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import pytest

from asgi_stream_core import workers
from tests.servers import Process, run_server

HELD = 40  # streams opened at once; all on one worker by chance: 2 in 2**40


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Process]:
    env = {"WORKERS": "2", "HOST": "127.0.0.1", "PORT": "{port}", "ECHO_DELAY_SECONDS": "0.25"}
    with run_server("workers", env, tmp_path, ["-m", "asgi_stream"]) as served:
        yield served


def worker_pids(pid: int) -> list[int]:
    """The worker processes `pid` started (not multiprocessing's resource tracker beside them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):  # not /proc/PID/task/PID/children: a kernel option
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (name)": state, ppid
            if parent == pid and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # a process that ended meanwhile
            continue
    return found


def established_on(port: int) -> set[str]:
    """Socket inodes of the connections accepted on `port` (server side), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # local port; ESTABLISHED
                inodes.add(fields[9])
    return inodes


def sockets_of(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def open_stream(port: int) -> socket.socket:
    body = json.dumps({"messages": [{"role": "user", "content": " ".join(["word"] * 60)}]}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /chat/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the stream has begun: its connection is held
    return sock


def test_open_streams_are_served_by_every_worker(two_workers: Process) -> None:
    with ExitStack() as held:
        for _ in range(HELD):
            held.enter_context(open_stream(two_workers.port))
        accepted = established_on(two_workers.port)
        per_worker = [len(sockets_of(pid) & accepted) for pid in worker_pids(two_workers.popen.pid)]
    assert len(per_worker) == 2 and sum(per_worker) == HELD and min(per_worker) > 0, per_worker


def test_sigterm_ends_every_worker_and_the_command_with_zero(two_workers: Process) -> None:
    pids = worker_pids(two_workers.popen.pid)
    assert len(pids) == 2 and f"asgi-stream: 2 workers on {two_workers.url}" in two_workers.output()
    two_workers.popen.send_signal(signal.SIGTERM)
    assert two_workers.popen.wait(30) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_a_worker_that_dies_stops_the_rest_and_the_command_with_one(two_workers: Process) -> None:
    os.kill(worker_pids(two_workers.popen.pid)[0], signal.SIGKILL)
    assert two_workers.popen.wait(30) == 1
    assert "Finished server process" in two_workers.output()  # the other worker ended as uvicorn ends


# --- in process: the supervisor with stand-in workers -----------------------------------


def test_supervise_stops_the_workers_on_sigterm_and_gives_back_the_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "serve_worker", sleep_a_minute)
    listeners = workers.listening_sockets("127.0.0.1", 0, 1)
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    assert workers.supervise(listeners, {}) == 0
    assert time.monotonic() - started < 30 and signal.getsignal(signal.SIGTERM) is before
    assert all(listener.fileno() == -1 for listener in listeners)  # the parent's copies closed


class StartsAfterAStop(multiprocessing.context.SpawnProcess):
    def start(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the stop arrives before this worker has a process
        super().start()


def test_a_stop_while_the_workers_start_stops_them_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "serve_worker", sleep_a_minute)
    monkeypatch.setattr(workers.multiprocessing, "get_context", lambda method: SimpleNamespace(Process=StartsAfterAStop))
    started = time.monotonic()
    assert workers.supervise(workers.listening_sockets("127.0.0.1", 0, 1), {}) == 0
    assert time.monotonic() - started < 30  # not the minute the worker would sleep


def test_supervise_ends_with_one_when_a_worker_ends_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "serve_worker", return_at_once)
    assert workers.supervise(workers.listening_sockets("127.0.0.1", 0, 2), {}) == 1


def test_two_sockets_on_one_port_each_accept() -> None:
    first = workers.listening_sockets("127.0.0.1", 0, 1)[0]
    port = first.getsockname()[1]
    second = workers.listening_sockets("127.0.0.1", port, 1)[0]  # the same port again: allowed, as SO_REUSEPORT
    with first, second:
        assert second.getsockname()[1] == port
        with pytest.raises(OSError):  # a socket without SO_REUSEPORT is still refused the port
            socket.create_server(("127.0.0.1", port))


def sleep_a_minute(listener: socket.socket, options: dict[str, object]) -> None:
    time.sleep(60)


def return_at_once(listener: socket.socket, options: dict[str, object]) -> None:
    return None
