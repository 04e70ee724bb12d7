"""Which upstream deadline governs when: until the first token only the
first-token deadline (a reasoning model may send its headers and then think in
silence), after it the idle deadline (no bytes at all; keep-alives count)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import stream
from tests.faultkit import serve_probed
from tests.upstream import FakeUpstream, Reply, sse_tokens

IDLE = 0.4  # seconds; every silence below is several times this, and far below FIRST_TOKEN
FIRST_TOKEN = 8.0


def data(token: str | None, finish: str | None = None) -> bytes:
    delta = {"content": token} if token is not None else {}
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + b"\n\n"


def chat_through(reply: Reply) -> tuple[list[str], list[str], list[str]]:
    """Stream one openai request whose upstream answers `reply`: (tokens, errors, done)."""
    with FakeUpstream(lambda seen: reply) as upstream:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream.url + "/v1",
               "IDLE_TIMEOUT_SECONDS": str(IDLE), "FIRST_TOKEN_TIMEOUT_SECONDS": str(FIRST_TOKEN)}  # fmt: skip
        with serve_probed(env) as gw:
            result = stream("GET", gw.url + "/chat/stream?prompt=think")
    assert result.status == 200
    return result.of("token"), result.of("error"), result.of("done")


def test_headers_then_thinking_longer_than_idle_is_not_cut() -> None:
    thinking = sse_tokens(["Deep", " thought"])
    thinking.pieces = [3 * IDLE, *thinking.pieces]  # headers at once, then silence, then the answer
    tokens, errors, done = chat_through(thinking)
    assert (tokens, errors, done) == (["Deep", " thought"], [], ["stop"])


def test_keep_alives_after_a_token_count_as_life() -> None:
    pings: list[bytes | float] = [b": keep-alive\n\n", IDLE / 8] * 24  # 3 idle times of pings, no token
    tokens, errors, done = chat_through(Reply(pieces=[data("Hel"), *pings, data("lo"), data(None, "stop"), b"data: [DONE]\n\n"]))
    assert (tokens, errors, done) == (["Hel", "lo"], [], ["stop"])


@pytest.mark.parametrize("silence_before_token", [0.0, 3 * IDLE], ids=["token-at-once", "token-after-thinking"])
def test_silence_after_a_token_longer_than_idle_is_cut_naming_the_idle_deadline(silence_before_token: float) -> None:
    tokens, errors, done = chat_through(Reply(pieces=[silence_before_token, data("Hel")], end="hang"))
    assert tokens == ["Hel"] and done == ["error"]
    (error,) = (json.loads(e) for e in errors)
    assert error["type"] == "timeout" and error["message"] == f"idle deadline: the upstream sent nothing for {IDLE:g} s"
