"""The Dockerfile, tested without a Docker engine: build a clean virtualenv
with the Dockerfile's own RUN command (runtime dependencies only, from PyPI),
lay the app files out as its COPY lines do, and start the exact CMD (host and
port aside) with the exact ENV; then probe it with the HEALTHCHECK command,
stream, and stop it with SIGTERM mid-stream."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, stream
from tests.servers import ROOT, body_of, open_stream, read_until, wait_until_serving

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.M)]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions(DOCKERFILE)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def exec_form(arguments: str) -> list[str]:
    argv = json.loads(arguments)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), "use the exec form (a JSON array)"
    return argv


def image_env(venv: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, arguments in final_stage():
        if op == "ENV":
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                env[name] = value.replace("/venv/bin", str(venv / "bin")).replace("$PATH", "/usr/bin:/bin")
    return env


@dataclass
class Image:
    venv: Path
    app: Path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The image's filesystem, built the Dockerfile's way."""
    root = tmp_path_factory.mktemp("image")
    build = root / "src"
    build.mkdir()
    shutil.copy(ROOT / "pyproject.toml", build)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)  # the base image's `python`
    (run,) = [args for op, args in instructions(DOCKERFILE) if op == "RUN" and "/venv" in args]
    venv = root / "venv"
    subprocess.run(["bash", "-euo", "pipefail", "-c", run.replace("/venv", str(venv))], cwd=build, check=True,
                   env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(root), "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
                   timeout=300, capture_output=True)  # fmt: skip
    app = root / "app"
    app.mkdir()
    for op, arguments in final_stage():
        if op == "COPY" and not arguments.startswith("--from"):
            *sources, target = arguments.split()
            for source in sources:  # a file into a directory ("./"), or a directory to its name
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, app / target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / source, app / target)
    return Image(venv, app)


def installed(venv: Path) -> set[str]:
    (site,) = venv.glob("lib/python3*/site-packages")
    return {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def test_the_image_venv_holds_the_runtime_dependencies_and_nothing_for_tests(image: Image) -> None:
    names = installed(image.venv)
    assert {"httpx", "anyio", "orjson", "uvicorn"} <= names
    assert not names & {"pytest", "hypothesis", "mypy", "ruff", "hypercorn", "granian", "daphne", "playwright", "trio", "pip"}
    app_files = ["asgi_stream.py", "index.html", "ledger.py", "openai_api.py", "providers", "sse.py", "stores"]
    assert sorted(p.name for p in image.app.iterdir()) == app_files
    print(f"\nruntime venv: {tree_bytes(image.venv) / 1e6:.1f} MB; app files: {tree_bytes(image.app) / 1e3:.0f} kB")


@pytest.fixture(scope="module")
def container(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes], int]]:
    (cmd,) = [exec_form(args) for op, args in final_stage() if op == "CMD"]
    port = free_port()
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000"
    argv = [a.replace("0.0.0.0", "127.0.0.1").replace("8000", str(port)) for a in cmd]
    data = tmp_path_factory.mktemp("data")
    env = {**image_env(image.venv), "USAGE_DB": str(data / "usage.db"), "ECHO_DELAY_SECONDS": "0.02"}
    log = data / "uvicorn.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, cwd=image.app, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, popen, log)
        yield url, popen, port
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(5)


def test_the_healthcheck_command_passes_against_the_cmd(
    image: Image, container: tuple[str, subprocess.Popen[bytes], int]
) -> None:
    _, _, port = container
    (check,) = [args for op, args in final_stage() if op == "HEALTHCHECK"]
    argv = exec_form(check.split(" CMD ", 1)[1])
    argv = [a.replace(":8000", f":{port}") for a in argv]
    env = image_env(image.venv)
    assert subprocess.run(argv, env=env, timeout=10).returncode == 0
    down = [a.replace(f":{port}", f":{free_port()}") for a in argv]
    assert subprocess.run(down, env=env, timeout=10, capture_output=True).returncode != 0  # it can fail


def test_the_cmd_serves_the_page_and_a_stream(image: Image, container: tuple[str, subprocess.Popen[bytes], int]) -> None:
    url, _, _ = container
    assert httpx.get(url + "/").text == (image.app / "index.html").read_text()
    result = stream("GET", url + "/chat/stream?prompt=hello%20from%20the%20image")
    assert result.text == "hello from the image" and result.of("done") == ["stop"]
    assert "server" not in result.headers


def test_sigterm_ends_open_streams_within_the_graceful_timeout(container: tuple[str, subprocess.Popen[bytes], int]) -> None:
    url, popen, _ = container
    (cmd,) = [exec_form(args) for op, args in final_stage() if op == "CMD"]
    grace = float(cmd[cmd.index("--timeout-graceful-shutdown") + 1])
    prompt = "%20".join(f"w{i}" for i in range(2000))
    request = f"GET /chat/stream?prompt={prompt} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
    with open_stream(url, request) as sock:
        head = read_until(sock, lambda got: b"event: token" in got)
        popen.send_signal(signal.SIGTERM)
        started = time.monotonic()
        rest = read_until(sock, lambda got: False, limit=grace + 5)
        took = time.monotonic() - started
    assert grace - 0.5 < took < grace + 2
    assert re.search(
        rb'event: error\nid: \S+\ndata: \{"type":"shutdown"[^\n]*\n\nevent: done\nid: \S+\ndata: error\n\n$', body_of(head + rest)
    )
    assert popen.wait(5) is not None
