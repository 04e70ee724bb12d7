"""The tools the suite runs on agree with one another: the SSE oracle declares
support for the Node that runs it, and the tools whose new releases could turn
a clean checkout red are capped to known-good ranges and installed inside them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.servers import ROOT

NODE_DIR = ROOT / "tests" / "node"
CAPPED = {"ruff", "mypy", "httpx", "httpcore", "uvicorn"}


def minimum_of(engines: str) -> tuple[int, ...]:
    """The lower bound of an npm engines range of the form `>=X[.Y[.Z]]`."""
    match = re.fullmatch(r">=\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", engines.strip())
    assert match, f"an engines range this check does not read: {engines!r}"
    return tuple(int(part or 0) for part in match.groups())


def test_minimum_of_reads_the_forms_npm_packages_use() -> None:
    assert minimum_of(">=18.0.0") == (18, 0, 0) and minimum_of(">= 22.12") == (22, 12, 0) and minimum_of(">=20") == (20, 0, 0)
    with pytest.raises(AssertionError):
        minimum_of("^18 || >=20")


def test_the_sse_oracle_declares_support_for_the_node_that_runs_it() -> None:
    node = shutil.which("node")
    assert node, "node is not installed (CI installs nodejs: see .ci/run)"
    installed = NODE_DIR / "node_modules" / "eventsource-parser" / "package.json"
    assert installed.exists(), "run `npm ci --prefix tests/node --no-audit --no-fund`"
    manifest = json.loads(installed.read_text())
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    assert manifest["version"] == lock["packages"]["node_modules/eventsource-parser"]["version"], "node_modules differs from the lock"
    running = tuple(int(part) for part in subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
                    .lstrip("v").split("."))  # fmt: skip
    needed = minimum_of(manifest["engines"]["node"])
    assert running >= needed, f"eventsource-parser {manifest['version']} needs Node {manifest['engines']['node']}, this is {running}"
    assert needed <= (18, 0, 0), "Debian 12 ships Node 18: the oracle must support it"


def test_tools_that_can_fail_a_clean_checkout_are_capped_and_installed_within_the_caps() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for name in CAPPED:
        specifiers = [r.specifier for r in declared if r.name == name]
        assert any(s.operator == "<" for spec in specifiers for s in spec), f"{name} has no upper cap in pyproject.toml"
        installed = Version(version(name))
        assert all(spec.contains(installed, prereleases=True) for spec in specifiers), f"{name} {installed} is outside {specifiers}"
