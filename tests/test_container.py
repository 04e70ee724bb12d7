"""The image, really built and run without a Docker engine: a small Debian base
made with mmdebstrap (Debian's mirror is the only registry these machines
reach), the project's own Dockerfile built from it by buildah (`--isolation
chroot`, vfs storage, `--format docker` so that HEALTHCHECK survives), then the
image's CMD and HEALTHCHECK run inside it as the image's user. Slow (minutes):
the base is made once per session. The shutdown budget check needs no build."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from asgi_stream_core import config, gateway, ledger
from tests.conftest import free_port, stream
from tests.servers import ROOT, body_of, open_stream, read_until, require_program, wait_until_serving

BASE_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
IMAGE_ENV = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "USAGE_DB"}  # all the image itself needs
SLOW = 1800  # seconds for a step that downloads or builds, on a slow machine
pytestmark = pytest.mark.timeout(2 * SLOW)  # the first test here waits for mmdebstrap and the build


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.M)]


def run(argv: list[str], timeout: float = SLOW, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{argv[:6]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


# --- the shutdown budget: no build needed


def test_the_shutdown_budget_fits_inside_the_compose_stop_grace_with_margin() -> None:
    """uvicorn's graceful timeout, then the lifespan's wait for the last ledger
    rows, must both end well before compose sends SIGKILL."""
    (cmd,) = [json.loads(args) for op, args in instructions((ROOT / "Dockerfile").read_text()) if op == "CMD"]
    graceful = float(cmd[cmd.index("--timeout-graceful-shutdown") + 1])
    (grace,) = re.findall(r"^\s*stop_grace_period:\s*(\d+)s\b", (ROOT / "docker-compose.yml").read_text(), re.M)
    ledger_wait = gateway.LEDGER_SHUTDOWN_WAIT_SECONDS + ledger.CLOSE_WAIT_SECONDS  # rows queued, then written
    assert graceful > 0 and ledger_wait > 0
    assert graceful + ledger_wait + 10 <= float(grace), (graceful, ledger_wait, grace)
    readme = (ROOT / "README.md").read_text()
    assert f"stop_grace_period: {grace}s" in readme or f"{grace} s" in readme, "the README states the stop grace"


# --- the real build


@dataclass
class Image:
    buildah: list[str]
    name: str
    container: str
    config: dict[str, Any]

    def run(self, argv: list[str], *options: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([*self.buildah, "run", "--isolation", "chroot", *options, self.container, "--", *argv], timeout=timeout)

    def popen(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        options = [f"--env={name}={value}" for name, value in env.items()]
        with log.open("wb") as out:
            return subprocess.Popen([*self.buildah, "run", "--isolation", "chroot", *options, self.container, "--", *argv],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


@pytest.fixture(scope="session")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """buildah with a storage of this session's own (vfs: no overlay mounts needed)."""
    program = require_program("buildah")
    require_program("mmdebstrap")
    if os.geteuid() != 0:
        message = "buildah's chroot isolation and mmdebstrap need root here (CI runs as root)"
        if os.environ.get("REQUIRE_SYSTEM_PROGRAMS"):
            pytest.fail(message)
        pytest.skip(message)
    storage = tmp_path_factory.mktemp("buildah")
    return [program, "--storage-driver", "vfs", "--root", str(storage / "root"), "--runroot", str(storage / "run")]


@pytest.fixture(scope="session")
def base_image(buildah: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """Stands in for python:3.11-slim-bookworm: Debian 12's Python with pip, from Debian's mirror."""
    rootfs = tmp_path_factory.mktemp("base") / "rootfs.tar"
    run(["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "--aptopt=Acquire::Retries 3", "bookworm", str(rootfs), MIRROR])
    name = "localhost/asgi-stream-base:bookworm"
    container = run([*buildah, "from", "scratch"]).stdout.strip()
    run([*buildah, "add", container, str(rootfs), "/"])
    run([*buildah, "config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", container])
    run([*buildah, "commit", "--rm", container, name])
    rootfs.unlink()
    return name


def build_pip_config(directory: Path) -> Path:
    """pip inside the build: this machine's CA bundle (its HTTPS may pass a
    proxy that signs with its own CA), and its index if it names one."""
    lines = ["[global]", "cert = /etc/ssl/certs/ca-certificates.crt"]
    index = os.environ.get("PIP_INDEX_URL", "")
    if index.startswith(("http://", "https://")):
        lines.append(f"index-url = {index}")
    path = directory / "pip.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def image(buildah: list[str], base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    work = tmp_path_factory.mktemp("build")
    bundle = os.environ.get("PIP_CERT") or ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    name = "localhost/asgi-stream:test"
    started = time.monotonic()
    run([*buildah, "bud", "--format", "docker", "--isolation", "chroot", "--build-arg", f"PYTHON_IMAGE={base_image}",
         "--volume", f"{bundle}:/etc/ssl/certs/ca-certificates.crt:ro", "--volume", f"{build_pip_config(work)}:/etc/pip.conf:ro",
         "--tag", name, "--file", str(ROOT / "Dockerfile"), str(ROOT)])  # fmt: skip
    built = time.monotonic() - started
    inspected = json.loads(run([*buildah, "inspect", "--type", "image", name]).stdout)
    layers = [layer["size"] for layer in json.loads(inspected["Manifest"])["layers"]]  # uncompressed layer tars, in bytes
    base_layers = len(json.loads(json.loads(run([*buildah, "inspect", "--type", "image", base_image]).stdout)["Manifest"])["layers"])
    print(f"\nimage {name}: {sum(layers) / 1e6:.1f} MB ({sum(layers[base_layers:]) / 1e6:.1f} MB above the base), built in {built:.0f} s")
    config = inspected["Docker"]["config"]
    container = run([*buildah, "from", name]).stdout.strip()
    try:
        yield Image(buildah, name, container, config)
    finally:
        subprocess.run([*buildah, "rm", container], capture_output=True, timeout=SLOW)
        subprocess.run([*buildah, "rmi", name], capture_output=True, timeout=SLOW)


def project_modules() -> list[str]:
    """Every top-level module and package the repository ships (tests and tools aside)."""
    modules = [p.stem for p in ROOT.glob("*.py")]
    packages = [p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in {"tests", "bench"}]
    return sorted(modules + packages)


def test_the_image_config_sets_only_what_the_image_needs(image: Image) -> None:
    """The app's own defaults stay the app's: an ENV MAX_TOKENS would break MAX_TOKENS_LIMIT below it."""
    env = dict(pair.split("=", 1) for pair in image.config["Env"])
    assert set(env) == IMAGE_ENV, set(env) - IMAGE_ENV
    assert not {variable for variable, _, _ in config.NUMBERS.values()} & set(env)
    assert env["PATH"].startswith("/venv/bin:") and env["USAGE_DB"] == "/data/usage.db"
    assert image.config["User"] == "app" and image.config["WorkingDir"] == "/app"
    assert list(image.config["ExposedPorts"]) == ["8000/tcp"] and "/data" in image.config["Volumes"]
    check = image.config["Healthcheck"]
    assert check["Test"][0] == "CMD" and "/healthz" in check["Test"][-1] and check["Retries"] >= 1
    assert image.config["Cmd"][:2] == ["uvicorn", "asgi_stream:app"]


def test_the_image_venv_imports_every_module_the_project_ships_and_no_test_tools(image: Image) -> None:
    modules = project_modules()
    assert {"asgi_stream", "providers"} <= set(modules), modules
    script = (
        "import importlib, importlib.metadata as m, json, sys; "
        f"files = {{name: importlib.import_module(name).__file__ for name in {modules!r}}}; "
        "print(json.dumps([files, sorted(d.metadata['Name'].lower() for d in m.distributions())]))"
    )
    files, installed = json.loads(image.run(["python", "-I", "-c", script], "--workingdir", "/").stdout)
    assert all(path.startswith("/venv/lib/") for path in files.values()), files  # installed, not loose files
    assert {"asgi-stream", "httpx", "anyio", "orjson", "uvicorn"} <= set(installed)
    assert not set(installed) & {"pytest", "hypothesis", "mypy", "ruff", "hypercorn", "granian", "daphne", "playwright", "trio", "pip"}
    assert image.run(["id", "-u"]).stdout.strip() == "10001"  # USER app, not root


@dataclass
class Running:
    url: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def served(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The image's CMD as the image runs it (host and port aside: the host's
    network is shared), with a setting the old ENV MAX_TOKENS=1024 broke."""
    cmd = image.config["Cmd"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000"
    port = free_port()
    argv = [{"0.0.0.0": "127.0.0.1", "8000": str(port)}.get(a, a) for a in cmd]
    log = tmp_path_factory.mktemp("served") / "uvicorn.log"
    popen = image.popen(argv, {"MAX_TOKENS_LIMIT": "512", "ECHO_DELAY_SECONDS": "0.02"}, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, popen, log, timeout=120)
        yield Running(url, port, popen, log)
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(30)


def test_the_healthcheck_command_passes_inside_the_image(image: Image, served: Running) -> None:
    argv = [a.replace(":8000/", f":{served.port}/") for a in image.config["Healthcheck"]["Test"][1:]]
    assert argv != image.config["Healthcheck"]["Test"][1:]  # the port was there to replace
    image.run(argv)
    down = [a.replace(f":{served.port}/", f":{free_port()}/") for a in argv]
    with pytest.raises(AssertionError, match="exited 1"):  # it can fail
        image.run(down)


def test_the_cmd_serves_the_page_and_a_stream_with_max_tokens_limit_512(served: Running) -> None:
    assert httpx.get(served.url + "/", timeout=30).text == (ROOT / "index.html").read_text()
    result = stream("GET", served.url + "/chat/stream?prompt=hello%20from%20the%20image")
    assert result.text == "hello from the image" and result.of("done") == ["stop"]
    assert "server" not in result.headers
    refused = httpx.get(served.url + "/chat/stream?prompt=hi&max_tokens=513", timeout=30)
    assert refused.status_code == 400 and "from 1 to 512" in refused.json()["error"]["message"]


def server_pid(root: int) -> int:
    """uvicorn's own pid: `buildah run` kills its child outright on SIGTERM,
    where docker would signal the container's first process."""
    children = {root}
    for _ in range(5):
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, ppid = int(status.parent.name), int(status.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid in children:
                children.add(pid)
    for pid in children - {root}:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # the server itself (`python …/uvicorn asgi_stream:app`), not a buildah process whose arguments name it
        if Path(argv[0].decode()).name.startswith(("python", "uvicorn")) and b"asgi_stream:app" in argv:
            return pid
    raise AssertionError(f"no uvicorn process under {root}")


def test_sigterm_ends_open_streams_after_the_graceful_timeout(image: Image, served: Running) -> None:
    cmd = image.config["Cmd"]
    grace = float(cmd[cmd.index("--timeout-graceful-shutdown") + 1])
    body = json.dumps({"messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(5000))}]})  # 100 s at 0.02 s a token
    head = f"POST /chat/stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    request = (head + body).encode()
    with open_stream(served.url, request) as sock:
        head = read_until(sock, lambda got: b"event: token" in got)
        os.kill(server_pid(served.popen.pid), signal.SIGTERM)
        started = time.monotonic()
        rest = read_until(sock, lambda got: False, limit=grace + 60)
        took = time.monotonic() - started
    assert took > grace - 0.5  # the open stream had its graceful window
    assert re.search(
        rb'event: error\nid: \S+\ndata: \{"type":"shutdown"[^\n]*\n\nevent: done\nid: \S+\ndata: error\n\n$', body_of(head + rest)
    )
    served.popen.wait(60)  # buildah reports the SIGTERM uvicorn re-raises at exit as status 1
    log = served.log.read_text(errors="replace")
    assert "Application shutdown complete." in log and "Finished server process" in log, log[-2000:]
