"""Probes for the fault-injection suite: what is still alive inside a served
gateway (streams, readers, pooled upstream connections, event-loop tasks,
uvicorn connections), the usage ledger's rows, and a secret scanner.

The probes run inside uvicorn's own event loop (`run_coroutine_threadsafe`),
so they see a consistent state, never a half-updated one.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

import asgi_stream
from tests.conftest import Served, serve


@dataclass(frozen=True)
class Alive:
    """What a served gateway still holds; all zero (tasks: at baseline) when idle."""

    active_streams: int
    readers: int  # clients attached to held stream records
    running_generations: int  # held records not yet finished
    pool_requests: int  # upstream requests checked out of the httpx pool
    busy_connections: int  # pooled connections neither idle nor closed
    server_connections: int  # uvicorn's open client connections
    tasks: int  # every task in uvicorn's event loop but the probe


def internal(owner: Any, name: str, package: str) -> Any:
    """A private attribute of httpx, httpcore or uvicorn, which the probe must
    read; when a release renames it, say so instead of failing obscurely
    (pyproject.toml caps these packages to the versions known to work)."""
    try:
        return getattr(owner, name)
    except AttributeError:
        raise AssertionError(
            f"{package} internals changed: {type(owner).__name__} has no {name!r} in {package} {version(package)}; "
            "the leak probe in tests/faultkit.py reads it: adapt the probe, or keep the version cap in pyproject.toml"
        ) from None


def _pools(gateway: asgi_stream.Gateway) -> list[Any]:
    """The httpcore pools behind the shared client (it shards over several)."""
    http = gateway.services.http if gateway.services is not None else None
    if http is None:
        return []
    transport = internal(http, "_transport", "httpx")
    return [internal(shard, "_pool", "httpx") for shard in transport._pools]


async def _probe(served: Served) -> Alive:
    gateway = served.gateway
    records = list(gateway.start().registry._streams.values())
    pools = _pools(gateway)
    connections = [c for pool in pools for c in internal(pool, "connections", "httpcore")]
    state = internal(served.server, "server_state", "uvicorn")
    return Alive(
        active_streams=gateway.metrics.active,
        readers=sum(r.readers for r in records),
        running_generations=sum(not r.finished for r in records),
        pool_requests=sum(len(internal(pool, "_requests", "httpcore")) for pool in pools),
        busy_connections=sum(not (internal(c, "is_idle", "httpcore")() or internal(c, "is_closed", "httpcore")()) for c in connections),
        server_connections=len(internal(state, "connections", "uvicorn")),
        tasks=len(asyncio.all_tasks()) - 1,
    )


def probe(served: Served) -> Alive:
    loop = served.server.servers[0].get_loop()
    return asyncio.run_coroutine_threadsafe(_probe(served), loop).result(5)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def assert_nothing_left(served: Served, baseline_tasks: int, timeout: float = 5.0) -> Alive:
    """Wait for the gateway to settle, then insist that it holds nothing."""

    def settled(alive: Alive) -> bool:
        return (
            alive.active_streams,
            alive.readers,
            alive.running_generations,
            alive.pool_requests,
            alive.busy_connections,
            alive.server_connections,
        ) == (0, 0, 0, 0, 0, 0) and alive.tasks <= baseline_tasks

    last = probe(served)
    deadline = time.monotonic() + timeout
    while not settled(last) and time.monotonic() < deadline:
        time.sleep(0.02)
        last = probe(served)
    assert settled(last), f"left behind: {last} (baseline tasks {baseline_tasks})"
    return last


@dataclass
class Probed:
    served: Served
    baseline_tasks: int
    hooks_seen: list[httpx.Request]

    @property
    def url(self) -> str:
        return self.served.url

    @property
    def gateway(self) -> asgi_stream.Gateway:
        return self.served.gateway

    def attempts(self) -> int:
        """Upstream requests the gateway sent (each retry is one)."""
        return len(self.hooks_seen)

    def nothing_left(self, timeout: float = 30.0) -> Alive:
        return assert_nothing_left(self.served, self.baseline_tasks, timeout)


@contextmanager
def serve_probed(env: dict[str, str], **uvicorn_options: object) -> Iterator[Probed]:
    """serve() plus a task baseline taken at idle and an upstream request counter."""
    with serve(env, **uvicorn_options) as served:
        hooks_seen: list[httpx.Request] = []

        async def count(request: httpx.Request) -> None:
            hooks_seen.append(request)

        http = served.gateway.start().http  # opened by lifespan already
        http.event_hooks = {**http.event_hooks, "request": [*http.event_hooks["request"], count]}
        yield Probed(served, probe(served).tasks, hooks_seen)


def usage_rows(path: Path) -> list[dict[str, Any]]:
    """The ledger, read after the server stopped."""
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'usage'").fetchone():
            return []  # the ledger creates its table with its first row
        return [dict(row) for row in db.execute("SELECT * FROM usage ORDER BY started_at, rowid")]


def assert_no_secret(text: str | bytes, *secrets: str) -> None:
    """None of `secrets` occurs in `text`, raw or in its common encodings."""
    haystack = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    for secret in secrets:
        for form in {secret, quote(secret, safe=""), secret.encode().hex()}:
            assert form not in haystack, f"a secret leaked: ...{haystack[max(0, haystack.find(form) - 60) :][:160]!r}"
