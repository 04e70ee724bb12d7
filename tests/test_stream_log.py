"""The per-stream log line reaches the output whatever server runs the app:
the real uvicorn command line as an operator types it, `python -m
asgi_stream`, hypercorn, granian and daphne, each exactly once per stream;
`LOG_LEVEL` can silence it."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.conftest import stream
from tests.servers import SERVERS, run_server

UVICORN_CLI = "-m uvicorn asgi_stream:app --host 127.0.0.1 --port {port} --timeout-graceful-shutdown 2".split()


def stream_end_lines(output: str) -> list[dict[str, object]]:
    """The stream_end objects logged; a host that configured logging (daphne)
    may put its own prefix before each."""
    lines = [orjson.loads(line[line.index("{"):]) for line in output.splitlines() if '"stream_end"' in line]
    return [line for line in lines if line["event"] == "stream_end"]


def stream_once(command: list[str], env: dict[str, str], tmp_path: Path) -> str:
    """Serve with `command`, stream one echo reply, stop the server: its whole output."""
    with run_server("log", env, tmp_path, command) as served:
        result = stream("GET", served.url + "/chat/stream?prompt=Hello+log")
        assert result.text == "Hello log" and result.of("done") == ["stop"]
    return served.log.read_text(errors="replace")


COMMANDS = {"uvicorn-cli": UVICORN_CLI, "python-m": ["-m", "asgi_stream"], **{name: SERVERS[name] for name in SERVERS if name != "uvicorn"}}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_one_json_line_per_stream_reaches_the_output(command: list[str], tmp_path: Path) -> None:
    output = stream_once(command, {"PORT": "{port}"}, tmp_path)
    (line,) = stream_end_lines(output)  # exactly one: not dropped, not printed twice
    assert line["backend"] == "echo" and line["finish_reason"] == "stop" and line["completion_tokens"] == 2


def test_log_level_warning_silences_the_stream_line(tmp_path: Path) -> None:
    output = stream_once(UVICORN_CLI, {"LOG_LEVEL": "WARNING"}, tmp_path)
    assert "Uvicorn running" in output  # the output was captured; only our line is missing
    assert stream_end_lines(output) == []
