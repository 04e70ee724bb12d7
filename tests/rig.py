"""One gateway (real uvicorn) with every backend pointed at one FakeUpstream,
shared by a test module so that many exchanges (fixtures in many cuts,
Hypothesis examples) cost one server start. Tests set `rig.replies`: the
upstream answers the n-th request with the n-th reply (the last repeats)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import Result, Served, serve, stream
from tests.upstream import FIXTURES, FakeUpstream, Reply, Seen

BACKENDS = ("openai", "anthropic", "ollama", "gemini")


def backend_env(url: str) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": "sk-test-SECRET", "OPENAI_BASE_URL": url + "/v1",
        "ANTHROPIC_API_KEY": "sk-ant-test-SECRET", "ANTHROPIC_BASE_URL": url,
        "GEMINI_API_KEY": "AIza-test-SECRET", "GEMINI_BASE_URL": url,
        "OLLAMA_BASE_URL": url,
    }  # fmt: skip


@dataclass
class Rig:
    upstream: FakeUpstream
    gw: Served
    replies: list[Reply] = field(default_factory=list)
    first_seen: int = 0  # upstream.seen index where the current test began

    def respond(self, seen: Seen) -> Reply:
        index = min(len(self.upstream.seen) - 1 - self.first_seen, len(self.replies) - 1)
        return self.replies[index]

    def reset(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.first_seen = len(self.upstream.seen)

    @property
    def seen(self) -> list[Seen]:
        return self.upstream.seen[self.first_seen :]

    def chat(self, backend: str, messages: list[dict[str, str]] | None = None, **fields: Any) -> Result:
        body = {"messages": messages or [{"role": "user", "content": "hi"}], "backend": backend, **fields}
        return stream("POST", self.gw.url + "/chat/stream", json=body)


@pytest.fixture(scope="module", name="rig")
def rig_fixture(request: pytest.FixtureRequest) -> Iterator[Rig]:
    holder: list[Rig] = []
    with FakeUpstream(lambda seen: holder[0].respond(seen)) as upstream:
        extra = getattr(request.module, "GATEWAY_ENV", {})
        with serve({**backend_env(upstream.url), **extra}) as gw:
            holder.append(Rig(upstream, gw))
            yield holder[0]


# --- fixtures -------------------------------------------------------------------


# How many recorded cases each backend has: a glob that found nothing would
# silently turn their parametrized tests into skips.
FIXTURE_COUNTS = {"openai": 7, "anthropic": 4, "ollama": 3, "gemini": 3}


def fixture_names(backend: str) -> list[str]:
    names = sorted(f"{backend}/{p.name.removesuffix('.expected.json')}" for p in (FIXTURES / backend).glob("*.expected.json"))
    assert len(names) == FIXTURE_COUNTS[backend], (backend, names)
    return names


def load_fixture(name: str) -> tuple[dict[str, Any], bytes]:
    expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    return expected, (FIXTURES / expected["fixture"]).read_bytes()


def natural_pieces(body: bytes) -> list[bytes]:
    """The body as its server writes it: one piece per SSE event or NDJSON line."""
    separator = b"\r\n\r\n" if b"\r\n\r\n" in body else b"\n\n" if b"\n\n" in body else b"\n"
    pieces = [p + separator for p in body.split(separator)]
    pieces[-1] = pieces[-1][: -len(separator)]
    return [p for p in pieces if p]


def cut(body: bytes, cuts: list[int]) -> list[bytes]:
    """`body` cut at the given offsets (anywhere: inside UTF-8, CRLF, JSON)."""
    edges = [0, *sorted(set(c for c in cuts if 0 < c < len(body))), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


def fixture_reply(name: str, pieces: list[bytes]) -> Reply:
    expected, _ = load_fixture(name)
    # an error answer that may be retried says "retry at once", to keep tests fast
    headers = {"retry-after": "0"} if expected["http_status"] != 200 else {}
    return Reply(expected["http_status"], expected["content_type"], list(pieces), headers)


def assert_expected(result: Result, expected: dict[str, Any]) -> None:
    """The client's events say what the fixture's expected.json says."""
    assert result.status == 200
    assert result.of("token") == expected["tokens"]
    assert result.names.count("done") == 1 and result.names[-1] == "done"
    assert result.of("done") == [expected["finish_reason"]]
    usages = [json.loads(u) for u in result.of("usage")]
    if expected["usage"] is not None:
        assert [{k: u[k] for k in expected["usage"]} for u in usages] == [expected["usage"]]
        assert "estimated" not in usages[0]
    else:  # no counts from upstream: the gateway estimates from what it streamed, and says so
        assert all(u.get("estimated") for u in usages) and len(usages) == (1 if expected["tokens"] else 0)
    if expected["error"] is None:
        assert "error" not in result.names
        return
    (error,) = [json.loads(e) for e in result.of("error")]
    assert error["message"] == expected["error"]["message"]
    assert error.get("upstream_type") == expected["error"]["type"]
    assert error.get("code") == expected["error"]["code"]
    if expected["http_status"] == 200:
        assert "status" not in error
    else:
        assert error["status"] == expected["http_status"] and error["type"] == "upstream_error"
    assert result.names[-2:] == ["error", "done"]
