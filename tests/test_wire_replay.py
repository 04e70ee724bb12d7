"""The same bytes on the wire for the same requests, across refactors.

tests/fixtures/wire-exchanges.json was recorded on the code before a change
that promised no change of behaviour (`RECORD_WIRE=1 pytest
tests/test_wire_replay.py` writes it); every run replays each exchange and
compares status, headers and the whole body, byte for byte, after replacing
what is random or timed (stream ids, `created`) with placeholders. Headers are
compared as a set of lines: the order of different header names carries no
meaning (RFC 9110, 5.3), and the one response writer of a later change orders
a whole response's content-type before its content-length on both routes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from asgi_stream import Gateway
from tests.test_inprocess import ENV, request
from tests.upstream import FakeUpstream, Reply, Seen, fixture_reply, sse_tokens

pytestmark = pytest.mark.anyio

RECORDING = Path(__file__).parent / "fixtures" / "wire-exchanges.json"
STREAM_ID = re.compile(rb"[A-Za-z0-9_-]{22}")
CREATED = re.compile(rb'"created":\d+')
JSON = ("content-type", "application/json")


def upstream_reply(seen: Seen) -> Reply:
    """One fake OpenAI-compatible upstream for every case: the prompt says what to do."""
    prompt = seen.json["messages"][-1]["content"]
    if prompt == "refuse":
        return Reply(400, "application/json", [b'{"error": {"message": "no such thing", "type": "invalid_request_error"}}'])
    if prompt == "busy":
        return Reply(429, "application/json", [b'{"error": {"message": "slow down"}}'], headers={"retry-after": "0"})
    if prompt == "cut":
        return Reply(pieces=sse_tokens(["Half", " an"]).pieces[:2], end="close")
    if prompt == "anthropic":
        return fixture_reply("anthropic/normal")
    return sse_tokens(["Hello", ",", " world", "\nline two"], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})


def chat(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], **fields}


# name: (extra env, method, path, query, headers, body)
CASES: dict[str, tuple[dict[str, str], str, str, str, list[tuple[str, str]], Any]] = {
    "echo-post": ({}, "POST", "/chat/stream", "", [JSON], chat("Hello there,  world!\n\nbye")),
    "echo-get": ({}, "GET", "/chat/stream", "prompt=Hi+you", [], None),
    "echo-get-messages": ({}, "GET", "/chat/stream", "messages=" + json.dumps([{"role": "user", "content": "a b"}]), [], None),
    "echo-array": ({}, "POST", "/chat/stream", "max_tokens=5", [JSON], [{"role": "user", "content": "x y z"}]),
    "echo-system-only": ({}, "POST", "/chat/stream", "", [JSON], {"messages": [{"role": "system", "content": "s"}]}),
    "openai-tokens": ({}, "POST", "/chat/stream", "", [JSON], chat("hi", backend="openai", model="m-1")),
    "openai-refused": ({}, "POST", "/chat/stream", "", [JSON], chat("refuse", backend="openai")),
    "openai-busy": ({}, "POST", "/chat/stream", "", [JSON], chat("busy", backend="openai")),
    "openai-cut": ({}, "POST", "/chat/stream", "", [JSON], chat("cut", backend="openai")),
    "anthropic-fixture": ({}, "POST", "/chat/stream", "", [JSON], chat("anthropic", backend="anthropic")),
    "bad-json": ({}, "POST", "/chat/stream", "", [JSON], b"{nope"),
    "bad-max-tokens": ({}, "POST", "/chat/stream", "", [JSON], chat("x", max_tokens="5")),
    "bad-backend": ({}, "POST", "/chat/stream", "", [JSON], chat("x", backend="nope")),
    "unconfigured-backend": ({}, "POST", "/chat/stream", "", [JSON], chat("x", backend="gemini")),
    "bad-role": ({}, "POST", "/chat/stream", "", [JSON], {"messages": [{"role": "robot", "content": "x"}]}),
    "both-prompt-and-messages": ({}, "GET", "/chat/stream", "prompt=a&messages=[]", [], None),
    "not-json": ({}, "POST", "/chat/stream", "", [("content-type", "text/plain")], b"hi"),
    "too-large": ({"MAX_BODY_BYTES": "10"}, "POST", "/chat/stream", "", [JSON], chat("far too long a body")),
    "unknown-path": ({}, "GET", "/nowhere", "", [], None),
    "wrong-method": ({}, "PUT", "/chat/stream", "", [], None),
    "huge-headers": ({}, "GET", "/healthz", "", [("x-big", "a" * 70000)], None),
    "no-key": ({"API_KEYS": "alice:k1"}, "POST", "/chat/stream", "", [JSON], chat("x")),
    "wrong-key": ({"API_KEYS": "alice:k1"}, "GET", "/chat/stream", "prompt=x&access_token=k2", [], None),
    "keyed-stream": ({"API_KEYS": "alice:k1"}, "GET", "/chat/stream", "prompt=x&access_token=k1", [], None),
    "cors-stream": ({"CORS_ORIGINS": "https://a.example"}, "GET", "/chat/stream", "prompt=x", [("origin", "https://a.example")], None),
    "cors-preflight": ({"CORS_ORIGINS": "https://a.example"}, "OPTIONS", "/chat/stream", "",
                       [("origin", "https://a.example"), ("access-control-request-method", "POST")], None),
    "cors-preflight-v1": ({"CORS_ORIGINS": "*"}, "OPTIONS", "/v1/chat/completions", "",
                          [("origin", "https://b.example"), ("access-control-request-headers", "x-stainless-os, authorization")], None),
    "cors-forbidden": ({"CORS_ORIGINS": "https://a.example"}, "OPTIONS", "/chat/stream", "", [("origin", "https://evil.example")], None),
    "resume-unknown": ({}, "GET", "/chat/stream", "", [("last-event-id", "nope.3")], None),
    "delete-unknown": ({}, "DELETE", "/chat/stream/nope", "", [], None),
    "healthz": ({}, "GET", "/healthz", "", [], None),
    "backends": ({"DEFAULT_MODEL": "tiny"}, "GET", "/backends", "", [], None),
    "v1-models": ({}, "GET", "/v1/models", "", [], None),
    "v1-echo-stream": ({}, "POST", "/v1/chat/completions", "", [JSON],
                       {"model": "echo/echo", "stream": True, "stream_options": {"include_usage": True}, **chat("one two")}),
    "v1-echo-whole": ({}, "POST", "/v1/chat/completions", "", [JSON], {"model": "echo", **chat("one two")}),
    "v1-openai-stream": ({}, "POST", "/v1/chat/completions", "", [JSON], {"model": "openai/m", "stream": True, **chat("hi")}),
    "v1-openai-busy": ({}, "POST", "/v1/chat/completions", "", [JSON], {"model": "openai/m", "stream": True, **chat("busy")}),
    "v1-openai-refused": ({}, "POST", "/v1/chat/completions", "", [JSON], {"model": "openai/m", **chat("refuse")}),
    "v1-openai-cut": ({}, "POST", "/v1/chat/completions", "", [JSON], {"model": "openai/m", "stream": True, **chat("cut")}),
    "v1-tools-refused": ({}, "POST", "/v1/chat/completions", "", [JSON], {"model": "echo", "tools": [{"type": "function"}], **chat("x")}),
    "v1-unknown-backend": ({}, "POST", "/v1/chat/completions", "", [JSON], {"model": "nope/m", **chat("x")}),
    "v1-bad-json": ({}, "POST", "/v1/chat/completions", "", [JSON], b"[1"),
    "v1-no-key": ({"API_KEYS": "alice:k1"}, "POST", "/v1/chat/completions", "", [JSON], {"model": "echo", **chat("x")}),
    "v1-not-json": ({}, "POST", "/v1/chat/completions", "", [("content-type", "text/plain")], b"x"),
}


def normalized(value: bytes, stream_ids: list[bytes]) -> str:
    for n, stream_id in enumerate(stream_ids):
        value = value.replace(stream_id, b"<stream-%d>" % n)
    value = re.sub(rb"chatcmpl-" + STREAM_ID.pattern, b"chatcmpl-<id>", value)
    return CREATED.sub(b'"created":<t>', value).decode("utf-8", "replace")


async def run_case(name: str, upstream_url: str) -> dict[str, Any]:
    env, method, path, query, headers, body = CASES[name]
    app = Gateway({**ENV, "DEFAULT_BACKEND": "echo", "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream_url + "/v1",
                   "ANTHROPIC_API_KEY": "sk-ant", "ANTHROPIC_BASE_URL": upstream_url, **env})  # fmt: skip
    raw = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    try:
        ex = await request(app, method, path, query, headers, [raw or b""])
        first = {k.decode(): v.decode() for k, v in ex.sent[0]["headers"]}.get("x-stream-id", "")
        ids = [first.encode()] if first else []
        recorded = {"status": ex.status, "headers": [[normalized(k, ids), normalized(v, ids)] for k, v in ex.sent[0]["headers"]],
                    "body": normalized(ex.body, ids)}  # fmt: skip
        if first and path == "/chat/stream" and ex.status == 200:  # and a resume of it, from its first event
            again = await request(app, "GET", "/chat/stream", query, [("last-event-id", f"{first}.1"), *headers])
            recorded["resume"] = {"status": again.status, "body": normalized(again.body, ids)}
    finally:
        await app.aclose()
    return recorded


@pytest.fixture(scope="module")
def upstream() -> Any:
    with FakeUpstream(upstream_reply) as server:
        yield server


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_every_recorded_exchange_answers_the_same_bytes(upstream: FakeUpstream) -> None:
    answers = {name: await run_case(name, upstream.url) for name in CASES}
    if os.environ.get("RECORD_WIRE") == "1":
        RECORDING.write_text(json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
    recorded = json.loads(RECORDING.read_text())
    assert sorted(recorded) == sorted(answers)
    for name in CASES:
        answer, record = dict(answers[name]), dict(recorded[name])
        assert sorted(map(tuple, answer.pop("headers"))) == sorted(map(tuple, record.pop("headers"))), name
        assert answer == record, name
