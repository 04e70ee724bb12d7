"""Several real gateway processes that share one Redis: start N replicas
(uvicorn, hypercorn's trio worker, `uvicorn --workers 2`) with the same
REDIS_URL, read their event streams and cut them at chosen points, and put a
real nginx in front that balances round robin over them."""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from httpx_sse import EventSource

from tests.conftest import free_port
from tests.servers import GRACE, ROOT, SERVERS, Process, run_server, serve_site
from tests.upstream import FakeUpstream, Reply, Seen, sse_tokens

SLOWNESS = 5  # the factor deadlines allow for a loaded machine
UVICORN_WORKERS = ["-m", "uvicorn", "asgi_stream:app", "--host", "127.0.0.1", "--port", "{port}", "--workers", "2",
                   "--timeout-graceful-shutdown", str(GRACE), "--log-level", "warning"]  # fmt: skip

# --- the fake model: what to say, and how slowly, is in the prompt ----------------


def words(count: int) -> list[str]:
    return [f" t{i}" for i in range(count)]


def respond(seen: Seen) -> Reply:
    """`slow <count> <pause>`: that many tokens, one every `pause` seconds;
    `forever`: a token every 0.05 s until the gateway hangs up."""
    prompt = seen.json["messages"][-1]["content"]
    kind, *args = prompt.split()
    if kind == "slow":
        return sse_tokens(words(int(args[0])), pause=float(args[1]), usage={"prompt_tokens": 3, "completion_tokens": int(args[0]),
                                                                            "total_tokens": 3 + int(args[0])})  # fmt: skip
    if kind == "forever":
        event = b'data: {"choices":[{"index":0,"delta":{"content":" x"},"finish_reason":null}]}\n\n'
        return Reply(pieces=[event], repeat=[0.05, event])
    return sse_tokens(["Hello", " world"])


def chat(prompt: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": prompt}], "backend": "openai"}


def gateway_env(upstream: FakeUpstream, redis_url: str, **extra: str) -> dict[str, str]:
    return {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream.url + "/v1", "REDIS_URL": redis_url,
            "RESUME_GRACE_SECONDS": "30", **extra}  # fmt: skip


# --- gateway replicas -------------------------------------------------------------


@contextmanager
def run_replicas(kinds: list[str], env: dict[str, str], tmp: Path, own_env: Callable[[int], dict[str, str]] | None = None
                 ) -> Iterator[list[Process]]:  # fmt: skip
    """One gateway process per entry of `kinds` (a SERVERS name, or
    "uvicorn-workers-2"), all with `env`, plus `own_env(i)` for replica i."""
    with ExitStack() as stack:
        replicas = []
        for i, kind in enumerate(kinds):
            command = UVICORN_WORKERS if kind == "uvicorn-workers-2" else SERVERS[kind]
            replicas.append(stack.enter_context(run_server(kind, {**env, **(own_env(i) if own_env else {})}, tmp, command)))
        yield replicas


# --- reading streams --------------------------------------------------------------


@dataclass
class Read:
    status: int
    headers: httpx.Headers
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (event, data, id)
    body: bytes = b""
    opened: tuple[str, str] | None = None  # a new stream's opening `stream` event (data, id), kept apart: it names the stream

    def take(self, event: str, data: str, event_id: str) -> bool:
        """Keep one event; False for the opening event, which is not one of the stream's held events."""
        if event == "stream" and not self.events and self.opened is None:
            assert data == self.headers["x-stream-id"] and event_id == f"{data}.0", (data, event_id)
            self.opened = (data, event_id)
            return False
        self.events.append((event, data, event_id))
        return True

    @property
    def tokens(self) -> list[str]:
        return [data for event, data, _ in self.events if event == "token"]

    def of(self, name: str) -> list[str]:
        return [data for event, data, _ in self.events if event == name]

    @property
    def last_id(self) -> str:
        return self.events[-1][2]


def read_stream(method: str, url: str, *, stop_after: int | None = None, timeout: float = 60, **kwargs: object) -> Read:
    """One request; its events until `done` or, with `stop_after`, until that
    many events have arrived, and then the connection is closed (a cut)."""
    with httpx.Client(timeout=timeout) as client, client.stream(method, url, **kwargs) as response:  # type: ignore[arg-type]
        read = Read(response.status_code, response.headers)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            read.body = response.read()
            return read
        for sse in EventSource(response).iter_sse():
            kept = read.take(sse.event, sse.data, sse.id)
            if kept and (sse.event == "done" or (stop_after is not None and len(read.events) >= stop_after)):
                break
    return read


def follow(method: str, url: str, got: list[tuple[str, str, str]], quit: threading.Event | None = None, **kwargs: object) -> Read:
    """A request to `url`/chat/stream read to `done` (or its end, or `quit`
    being set), each event appended to `got` as it arrives, for another thread to watch."""
    with httpx.Client(timeout=120) as client, client.stream(method, url + "/chat/stream", **kwargs) as response:  # type: ignore[arg-type]
        read = Read(response.status_code, response.headers)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            read.body = response.read()
            return read
        for sse in EventSource(response).iter_sse():
            if read.take(sse.event, sse.data, sse.id):
                got.append(read.events[-1])
            if sse.event == "done" or (quit is not None and quit.is_set()):
                break
    return read


def resume(url: str, last_event_id: str, headers: dict[str, str] | None = None, **kwargs: object) -> Read:
    return read_stream("GET", url + "/chat/stream", headers={"last-event-id": last_event_id, **(headers or {})}, **kwargs)


def positions(events: list[tuple[str, str, str]]) -> list[int]:
    return [int(i.rsplit(".", 1)[1]) for _, _, i in events]


def stream_ids(events: list[tuple[str, str, str]]) -> set[str]:
    return {i.rsplit(".", 1)[0] for _, _, i in events}


def seen_with(upstream: FakeUpstream, prompt: str) -> list[Seen]:
    return [s for s in upstream.seen if s.json["messages"][-1]["content"] == prompt]


def wait_for(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def ledger_rows(paths: list[Path], stream_id: str) -> list[dict[str, object]]:
    """The usage rows of `stream_id` in every replica's SQLite ledger."""
    rows: list[dict[str, object]] = []
    for path in paths:
        if not path.exists():
            continue
        with sqlite3.connect(path) as db:
            db.row_factory = sqlite3.Row
            try:
                rows += [dict(row) for row in db.execute("SELECT * FROM usage WHERE stream_id = ?", (stream_id,))]
            except sqlite3.OperationalError:  # no table yet: that replica wrote no row
                pass
    return rows


# --- nginx round robin over the replicas ------------------------------------------


def balanced_site(replicas: list[str], listen: str, read_timeout: str = "60s") -> str:
    """The repo's nginx.conf with its upstream block listing every replica
    (round robin, nginx's default) and each request's replica logged."""
    text = (ROOT / "nginx.conf").read_text()
    old = "    server app:8000;"
    assert text.count(old) == 1 and text.count("listen 80;") == 1, "nginx.conf changed shape"
    servers = "\n".join(f"    server {address};" for address in replicas)
    text = text.replace(old, servers + "  # round robin").replace("listen 80;", f"listen {listen};")
    text = text.replace("proxy_read_timeout 60s;", f"proxy_read_timeout {read_timeout};")
    log_format = "log_format replicas '$request_method $uri $status $upstream_addr';\n"
    return log_format + text


@contextmanager
def run_balancer(replicas: list[str], tmp: Path) -> Iterator[str]:
    """A real nginx balancing over `replicas` (host:port); yields its URL.
    tmp/replicas.log gets one line per request: method, path, status, replica."""
    port = free_port()
    site = tmp / "site.conf"
    site.write_text(balanced_site(replicas, f"127.0.0.1:{port}").replace(
        "location / {", f"access_log {tmp / 'replicas.log'} replicas;\n    location / {{", 1))  # fmt: skip
    with serve_site(site, port, tmp) as url:
        yield url


# --- a proxy that cuts event streams at random points -----------------------------


class RandomCuttingProxy:
    """A TCP proxy on 127.0.0.1 that cuts each of the first `cuts`
    event-stream responses after a random number of bytes in [low, high]
    (seeded), closing both sides, as a flaky network would."""

    def __init__(self, target_port: int, cuts: int, low: int, high: int, seed: int):
        rng = random.Random(seed)
        self.afters = [rng.randint(low, high) for _ in range(cuts)]
        self.cut_at: list[int] = []  # the byte counts of the responses armed so far
        self.cuts = 0  # responses really cut (a stream may end before its count)
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._forward, args=(client, server), daemon=True).start()
            threading.Thread(target=self._back, args=(server, client), daemon=True).start()

    def _forward(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            close(source, sink)

    def _back(self, server: socket.socket, client: socket.socket) -> None:
        head, limit, sent = b"", None, 0
        try:
            while data := server.recv(65536):
                if limit is None:
                    head = (head + data)[-4096:]
                    with self.lock:
                        if b"text/event-stream" in head.lower() and len(self.cut_at) < len(self.afters):
                            limit = self.afters[len(self.cut_at)]
                            self.cut_at.append(limit)
                if limit is not None:
                    data = data[: limit - sent]
                    sent += len(data)
                client.sendall(data)
                if limit is not None and sent >= limit:
                    with self.lock:
                        self.cuts += 1
                    break
        except OSError:
            pass
        finally:
            close(server, client)

    def close(self) -> None:
        self.listener.close()


def close(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


# --- DELETE across replicas (tests/test_replicas.py, bench/replica_cancel.py) ---------


@contextmanager
def quitting(quit: threading.Event) -> Iterator[None]:
    try:
        yield
    finally:
        quit.set()


def kill_owner_while_followed(owner: Process, other: Process, last_id: str) -> tuple[Read, float]:
    """Follow the owner's live stream from `last_id` on `other`; once three
    events have come, SIGKILL the owner. The follower's read to its end, and
    when the kill was sent (time.monotonic)."""
    got: list[tuple[str, str, str]] = []
    quit = threading.Event()
    with ThreadPoolExecutor(1) as pool, quitting(quit):
        follower = pool.submit(follow, "GET", other.url, got, quit, headers={"last-event-id": last_id})
        assert wait_for(lambda: len(got) >= 3, 20 * SLOWNESS), "the reader on b never followed the live generation"
        assert follower.running()
        os.killpg(owner.popen.pid, signal.SIGKILL)
        killed = time.monotonic()
        return follower.result(60 * SLOWNESS), killed


def cancel_across(owner: Process, other: Process, upstream: FakeUpstream, prompt: str) -> float:
    """Start `prompt` on `owner` with a reader there, DELETE it on `other`;
    the seconds from sending DELETE to the upstream connection closing."""
    got: list[tuple[str, str, str]] = []
    quit = threading.Event()  # a failed assertion must not leave the reader of an endless stream behind
    with ThreadPoolExecutor(1) as pool, quitting(quit):
        reader = pool.submit(follow, "POST", owner.url, got, quit, json=chat(prompt))
        assert wait_for(lambda: len(got) >= 2, 20 * SLOWNESS), "the stream never started"
        seen = seen_with(upstream, prompt)[0]
        stream_id = got[0][2].rsplit(".", 1)[0]
        sent = time.monotonic()
        response = httpx.delete(f"{other.url}/chat/stream/{stream_id}", timeout=30)
        assert response.status_code == 204, (response.status_code, response.text)
        assert upstream.wait_for(lambda: seen.closed_by_client is not None, 10 * SLOWNESS), "the owner never closed the upstream request"
        assert seen.closed_by_client is not None
        result = reader.result(30 * SLOWNESS)
    assert not seen.completed
    assert result.of("done") == ["cancelled"], result.events[-3:]
    assert httpx.delete(f"{other.url}/chat/stream/{stream_id}", timeout=30).status_code == 404  # finished now
    return seen.closed_by_client - sent
