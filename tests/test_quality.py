"""The codebase's own standards, checked by the test suite: mypy --strict on
the core and ruff on everything (configured in pyproject.toml). `ruff format`
is not enforced: the core keeps some hand-aligned tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_core_is_mypy_strict_clean() -> None:
    done = run("mypy", "--strict", "asgi_stream.py", "asgi_stream_core/", "providers/")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("Success: no issues found")


def test_ruff_check_passes_on_everything() -> None:
    done = run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr
