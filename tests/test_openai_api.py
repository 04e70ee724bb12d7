"""The OpenAI-compatible route as its users meet it: the official `openai`
SDKs (Python sync and async, and the npm package through Node) against the
gateway in a real uvicorn, every backend answering from one fake upstream.
Text, finish reasons, usage and errors must come out as the SDKs' own values
and exceptions; a client that leaves must stop the upstream at once."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asgi_stream_core import config
from tests.conftest import closed_after_test, serve
from tests.rig import Rig, backend_env, rig_fixture  # noqa: F401
from tests.upstream import Reply, Seen

USAGE_DB = str(Path(tempfile.mkdtemp(prefix="openai-api-")) / "usage.db")
ORIGIN = "https://app.example"
GATEWAY_ENV = {
    "API_KEYS": "alice:gw-alice,bob:gw-bob", "MAX_STREAMS_PER_KEY": "3", "RESUME_GRACE_SECONDS": "30",
    "CORS_ORIGINS": ORIGIN, "USAGE_DB": USAGE_DB, "MAX_BODY_BYTES": "65536", "MAX_TOKENS_LIMIT": "4096",
}  # fmt: skip
UPSTREAM_BACKENDS = ("openai", "anthropic", "ollama", "gemini")
ALL_BACKENDS = ("echo", *UPSTREAM_BACKENDS)
NODE_CLIENT = Path(__file__).with_name("node") / "openai_client.mjs"
HI = [{"role": "user", "content": "hi"}]


def model_of(backend: str) -> str:
    return f"{backend}/{config.BACKENDS[backend].default_model}"


def client(rig: Rig, key: str = "gw-alice", **options: Any) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=rig.gw.url + "/v1", api_key=key, **{"max_retries": 0, "timeout": 30, **options}))


# --- what each backend's upstream sends, for a list of tokens -------------------------

FINISH = {"anthropic": {"stop": "end_turn", "length": "max_tokens"}, "gemini": {"stop": "STOP", "length": "MAX_TOKENS"}}


def sse(obj: object, event: str | None = None) -> bytes:
    return (f"event: {event}\n" if event else "").encode() + b"data: " + json.dumps(obj).encode() + b"\n\n"


def token_piece(backend: str, token: str) -> bytes:
    if backend == "openai":
        return sse({"choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]})
    if backend == "anthropic":
        return sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}}, "content_block_delta")
    if backend == "ollama":
        return json.dumps({"message": {"role": "assistant", "content": token}, "done": False}).encode() + b"\n"
    return b"data: " + json.dumps({"candidates": [{"content": {"parts": [{"text": token}], "role": "model"}}]}).encode() + b"\r\n\r\n"


def opening_pieces(backend: str, prompt: int) -> list[bytes | float]:
    if backend != "anthropic":
        return []
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                                  "usage": {"input_tokens": prompt, "output_tokens": 1}}}  # fmt: skip
    return [sse(start, "message_start"), sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                                             "content_block_start")]  # fmt: skip


def closing_pieces(backend: str, finish: str, prompt: int, completion: int) -> list[bytes | float]:
    raw = FINISH.get(backend, {}).get(finish, finish)
    if backend == "openai":
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        finish_chunk = sse({"choices": [{"index": 0, "delta": {}, "finish_reason": raw}]})
        return [finish_chunk, sse({"choices": [], "usage": usage}), b"data: [DONE]\n\n"]
    if backend == "anthropic":
        delta = {"type": "message_delta", "delta": {"stop_reason": raw}, "usage": {"output_tokens": completion}}
        return [sse(delta, "message_delta"), sse({"type": "message_stop"}, "message_stop")]
    if backend == "ollama":
        done = {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": raw,
                "prompt_eval_count": prompt, "eval_count": completion}  # fmt: skip
        return [json.dumps(done).encode() + b"\n"]
    meta = {"promptTokenCount": prompt, "candidatesTokenCount": completion, "totalTokenCount": prompt + completion}
    last = {"candidates": [{"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": raw}], "usageMetadata": meta}
    return [b"data: " + json.dumps(last).encode() + b"\r\n\r\n"]


def error_piece(backend: str, message: str) -> bytes:
    """A failure the upstream reports after its 200, in its own way."""
    if backend == "openai":
        return sse({"error": {"message": message, "type": "server_error"}})
    if backend == "anthropic":
        return sse({"type": "error", "error": {"type": "api_error", "message": message}}, "error")
    if backend == "ollama":
        return json.dumps({"error": message}).encode() + b"\n"
    return b"data: " + json.dumps({"error": {"code": 500, "message": message, "status": "INTERNAL"}}).encode() + b"\r\n\r\n"


CONTENT_TYPES = {"ollama": "application/x-ndjson"}


def tokens_reply(backend: str, tokens: list[str], finish: str = "stop", usage: tuple[int, int] = (11, 7), pause: float = 0.0,
                 ) -> Reply:  # fmt: skip
    pieces = opening_pieces(backend, usage[0])
    for token in tokens:
        pieces += [token_piece(backend, token), *([pause] if pause else [])]
    return Reply(200, CONTENT_TYPES.get(backend, "text/event-stream"), pieces + closing_pieces(backend, finish, *usage))


def failing_reply(backend: str, tokens: list[str], message: str) -> Reply:
    pieces = opening_pieces(backend, 3) + [token_piece(backend, t) for t in tokens] + [error_piece(backend, message)]
    return Reply(200, CONTENT_TYPES.get(backend, "text/event-stream"), pieces)


def endless_reply(backend: str) -> Reply:
    """A first token, then more every 50 ms until the gateway hangs up."""
    first = [*opening_pieces(backend, 3), token_piece(backend, "tick ")]
    return Reply(200, CONTENT_TYPES.get(backend, "text/event-stream"), first, repeat=[0.05, token_piece(backend, "tick ")])


def http_error(status: int, message: str, retry_after: str | None = "0") -> Reply:
    body = json.dumps({"error": {"message": message, "type": "some_upstream_type"}}).encode()
    return Reply(status, "application/json", [body], {"retry-after": retry_after} if retry_after else {})


def backend_of(seen: Seen) -> str:
    if seen.path.startswith("/v1/chat/completions"):
        return "openai"
    return {"/v1/messages": "anthropic", "/api/chat": "ollama"}.get(seen.path, "gemini")


@contextmanager
def answering(rig: Rig, reply_for: Callable[[str], Reply]) -> Iterator[None]:
    """The upstream answers each backend's request with reply_for(backend)."""
    rig.reset()
    rig.respond = lambda seen: reply_for(backend_of(seen))  # type: ignore[method-assign]
    try:
        yield
    finally:
        del rig.respond


def error_message(error: openai.APIStatusError) -> Any:
    """The message as sent (the SDK prefixes its own to `str(error)`)."""
    return error.body["message"] if isinstance(error.body, dict) else None


def upstream_body(rig: Rig, backend: str) -> dict[str, Any]:
    (seen,) = [s for s in rig.seen if backend_of(s) == backend]
    return dict(seen.json)


# --- streaming and not, from every backend ---------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_python_sdk_streams_every_backends_text_with_one_id_role_finish_and_usage(rig: Rig, backend: str) -> None:
    tokens = ["Hel", "lo", " wor", "ld"]
    prompt = "Hello world" if backend == "echo" else "hi"
    with answering(rig, lambda b: tokens_reply(b, tokens)):
        chunks = list(client(rig).chat.completions.create(model=model_of(backend), messages=[{"role": "user", "content": prompt}],
                                                          stream=True, stream_options={"include_usage": True}))  # fmt: skip
    choices = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.delta.content or "" for c in choices) == "Hello world"
    assert choices[0].delta.role == "assistant" and all(c.delta.role is None for c in choices[1:])
    assert [c.finish_reason for c in choices] == [None] * (len(choices) - 1) + ["stop"]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {model_of(backend)} and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    if backend != "echo":  # the upstream's own counts
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, chunks[-1].usage.total_tokens) == (11, 7, 18)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_python_sdk_without_stream_gets_one_completion_with_text_finish_and_usage(rig: Rig, backend: str) -> None:
    prompt = "one two three" if backend == "echo" else "hi"
    with answering(rig, lambda b: tokens_reply(b, ["one ", "two ", "three"], finish="length")):
        completion = client(rig).chat.completions.create(model=model_of(backend), messages=[{"role": "user", "content": prompt}],
                                                         max_tokens=3 if backend == "echo" else 50)  # fmt: skip
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.content == "one two three" and completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == ("stop" if backend == "echo" else "length")
    assert completion.usage is not None and completion.usage.completion_tokens == (3 if backend == "echo" else 7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_python_sdk_stream_helper_gives_content_events_and_the_final_completion(rig: Rig, backend: str) -> None:
    prompt = "a b c" if backend == "echo" else "hi"
    with answering(rig, lambda b: tokens_reply(b, ["a ", "b ", "c"])):
        with client(rig).chat.completions.stream(model=model_of(backend), messages=[{"role": "user", "content": prompt}]) as stream:
            deltas = [event.delta for event in stream if event.type == "content.delta"]
            final = stream.get_final_completion()
    assert "".join(deltas) == "a b c"
    assert final.choices[0].message.content == "a b c" and final.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_async_python_sdk_streams_and_completes(rig: Rig, backend: str) -> None:
    prompt = "x y" if backend == "echo" else "hi"

    async def run() -> tuple[str, str | None]:
        async with openai.AsyncOpenAI(base_url=rig.gw.url + "/v1", api_key="gw-alice", max_retries=0) as api:
            stream = await api.chat.completions.create(model=model_of(backend), messages=[{"role": "user", "content": prompt}], stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            whole = await api.chat.completions.create(model=model_of(backend), messages=[{"role": "user", "content": prompt}])
            return text, whole.choices[0].message.content

    with answering(rig, lambda b: tokens_reply(b, ["x ", "y"])):
        assert asyncio.run(run()) == ("x y", "x y")


def test_without_include_usage_no_usage_chunk_is_sent(rig: Rig) -> None:
    with answering(rig, lambda b: tokens_reply(b, ["a"])):
        chunks = list(client(rig).chat.completions.create(model="openai/gpt-x", messages=HI, stream=True))
    assert all(c.choices and c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "stop"


# --- the request as each backend receives it --------------------------------------------


@pytest.mark.parametrize("backend", UPSTREAM_BACKENDS)
def test_sampling_fields_reach_each_backend_in_its_own_field(rig: Rig, backend: str) -> None:
    with answering(rig, lambda b: tokens_reply(b, ["ok"])):
        client(rig).chat.completions.create(model=f"{backend}/m-1", messages=HI, max_completion_tokens=33, temperature=0.5, top_p=0.75,
                                            stop="END", user="u-1", metadata={"a": "b"}, seed=4)  # fmt: skip
    body = upstream_body(rig, backend)
    if backend == "openai":
        assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"], body["stop"]) == ("m-1", 33, 0.5, 0.75, ["END"])
        assert "user" not in body and "metadata" not in body and "seed" not in body
    elif backend == "anthropic":
        assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"]) == ("m-1", 33, 0.5, 0.75)
        assert body["stop_sequences"] == ["END"]
    elif backend == "ollama":
        assert body["model"] == "m-1"
        assert body["options"] == {"num_predict": 33, "temperature": 0.5, "top_p": 0.75, "stop": ["END"]}
    else:
        assert rig.seen[0].path.startswith("/v1beta/models/m-1:streamGenerateContent")
        assert body["generationConfig"] == {"maxOutputTokens": 33, "temperature": 0.5, "topP": 0.75, "stopSequences": ["END"]}


def test_developer_is_system_text_parts_are_joined_and_a_bare_model_goes_to_the_default_backend(rig: Rig) -> None:
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
                {"role": "assistant", "content": "Yes?"},
                {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]}]  # fmt: skip
    with answering(rig, lambda b: tokens_reply(b, ["ok"])):
        client(rig).chat.completions.create(model="gpt-bare", messages=messages, stop=["a", "b", "c", "d"])  # type: ignore[arg-type]
    body = upstream_body(rig, "openai")  # DEFAULT_BACKEND: openai is configured first
    assert body["model"] == "gpt-bare" and body["stop"] == ["a", "b", "c", "d"]
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
                                {"role": "assistant", "content": "Yes?"}, {"role": "user", "content": "Part one.\nPart two."}]  # fmt: skip


def test_models_lists_each_configured_backends_default_model(rig: Rig) -> None:
    models = client(rig).models.list()
    assert [m.id for m in models.data] == [model_of(b) for b in config.BACKENDS]
    assert {m.owned_by for m in models.data} == set(config.BACKENDS) and models.object == "list"


# --- refusals, as the SDK's exceptions ---------------------------------------------------

REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0]", "must be {type: function"),
    ({"tool_choice": "required"}, "tool_choice", "'required' needs tools"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions", "legacy shape) is not supported"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format must be"),
    ({"n": 2}, "n", "n=2 is not supported"),
    ({"logprobs": True}, "logprobs", "logprobs is not supported"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id", "must name the call"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[0].image_url", "data:image/... or an https URL"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
     "messages[0].content[0]", "parts are text or image_url"),
    ({"messages": [{"role": "critic", "content": "x"}]}, "messages[0].role", "must be one of system, developer, user, assistant"),
    ({"messages": []}, "messages", "non-empty array"),
    ({"max_tokens": 0}, "max_tokens", "from 1 to 4096"),
    ({"max_completion_tokens": 4097}, "max_completion_tokens", "from 1 to 4096"),
    ({"temperature": 2.5}, "temperature", "from 0 to 2"),
    ({"top_p": 1.5}, "top_p", "from 0 to 1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"stop": [""]}, "stop", "non-empty string"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"model": "echo/bad model"}, "model", "not a valid model name for echo"),
    ({"model": "gemini/../x"}, "model", "not a valid model name for gemini"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param", "message"), REFUSED, ids=[f"{p}:{next(iter(f))}" for f, p, _ in REFUSED])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(rig: Rig, fields: dict[str, Any], param: str, message: str) -> None:
    rig.reset()
    request = {"model": "echo/echo", "messages": HI, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client(rig).chat.completions.create(**request)
    assert caught.value.status_code == 400 and caught.value.param == param and message in caught.value.message
    assert caught.value.type == "invalid_request_error" and caught.value.code in ("invalid_request", "unsupported_parameter")
    assert rig.seen == []  # refused before any upstream request


@pytest.mark.parametrize("fields", [{"n": 1, "logprobs": False, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}},
                                    {"frequency_penalty": 0.5, "service_tier": "auto", "parallel_tool_calls": False}])  # fmt: skip
def test_harmless_values_of_those_fields_and_unknown_fields_are_accepted(rig: Rig, fields: dict[str, Any]) -> None:
    completion = client(rig).chat.completions.create(model="echo/echo", messages=[{"role": "user", "content": "fine"}], **fields)
    assert completion.choices[0].message.content == "fine"


@pytest.mark.parametrize("model", ["nope/x", "azure/gpt-4o"])
def test_an_unknown_backend_is_a_404_not_found(rig: Rig, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(rig).chat.completions.create(model=model, messages=HI)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found" and caught.value.param == "model" and "backends: echo, openai" in caught.value.message


def test_a_backend_that_is_not_configured_is_a_404(rig: Rig) -> None:
    with serve({}) as gw:  # echo only
        api = closed_after_test(openai.OpenAI(base_url=gw.url + "/v1", api_key="-", max_retries=0))
        with pytest.raises(openai.NotFoundError, match="ANTHROPIC_API_KEY is not set"):
            api.chat.completions.create(model="anthropic/claude-x", messages=HI)  # type: ignore[arg-type]
        assert [m.id for m in api.models.list().data] == ["echo/echo"]
        assert api.chat.completions.create(model="whatever", messages=[{"role": "user", "content": "bare"}]).model == "echo/whatever"


def test_a_wrong_or_missing_key_is_an_authentication_error(rig: Rig) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(rig, key="wrong").chat.completions.create(model="echo/echo", messages=HI)
    assert caught.value.status_code == 401 and caught.value.type == "authentication_error" and "API key" in caught.value.message
    with pytest.raises(openai.AuthenticationError):
        client(rig, key="wrong").models.list()
    response = httpx.post(rig.gw.url + "/v1/chat/completions", json={"model": "echo/echo", "messages": HI})
    assert response.status_code == 401 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_body_over_the_limit_is_a_413_in_openai_shape(rig: Rig) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client(rig).chat.completions.create(model="echo/echo", messages=[{"role": "user", "content": "x" * 70000}])
    assert caught.value.status_code == 413 and caught.value.code == "payload_too_large"


@pytest.mark.parametrize(("method", "content_type", "status"), [("GET", None, 405), ("POST", "text/plain", 415)])
def test_other_http_refusals_on_the_route_use_openai_shape(rig: Rig, method: str, content_type: str | None, status: int) -> None:
    headers = {"authorization": "Bearer gw-alice", **({"content-type": content_type} if content_type else {})}
    response = httpx.request(method, rig.gw.url + "/v1/chat/completions", headers=headers, content=b"{}" if content_type else None)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    response = httpx.get(rig.gw.url + "/v1/nothing", headers=headers)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_beyond_the_per_key_limit_is_a_rate_limit_error_with_retry_after(rig: Rig) -> None:
    bob = client(rig, key="gw-bob")
    with answering(rig, endless_reply):
        held = [bob.chat.completions.create(model="openai/x", messages=HI, stream=True) for _ in range(3)]
        for stream in held:  # each stream started: its first token is in
            assert next(iter(stream)).choices[0].delta.role == "assistant"
        with pytest.raises(openai.RateLimitError) as caught:
            bob.chat.completions.create(model="openai/x", messages=HI, stream=True)
        assert caught.value.response.headers["retry-after"] == "1" and caught.value.code == "rate_limited"
        for stream in held:
            stream.close()
        assert rig.upstream.wait_for(lambda: "bob" not in rig.gw.gateway.metrics.active_by_key, 10)


def test_beyond_the_server_limit_is_a_503_with_retry_after(rig: Rig) -> None:
    with serve({"MAX_STREAMS": "1", "ECHO_DELAY_SECONDS": "0.05"}) as gw:
        api = closed_after_test(openai.OpenAI(base_url=gw.url + "/v1", api_key="-", max_retries=0))
        with api.chat.completions.create(model="echo/echo", messages=[{"role": "user", "content": "a b c d e f"}], stream=True) as held:
            next(iter(held))
            with pytest.raises(openai.InternalServerError) as caught:
                api.chat.completions.create(model="echo/echo", messages=HI)
    assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "1"


# --- upstream failures ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("backend", UPSTREAM_BACKENDS)
def test_an_upstream_429_before_any_token_is_a_rate_limit_error(rig: Rig, backend: str, stream: bool) -> None:
    with answering(rig, lambda b: http_error(429, "slow down, please", "0")):
        with pytest.raises(openai.RateLimitError) as caught:
            list(client(rig).chat.completions.create(model=f"{backend}/m", messages=HI, stream=stream))  # type: ignore[call-overload]
    assert caught.value.status_code == 429 and error_message(caught.value) == "slow down, please"
    assert caught.value.response.headers["retry-after"] == "0" and caught.value.type == "rate_limit_error"
    assert len(rig.seen) == 3  # the gateway's retries came first


@pytest.mark.parametrize(("upstream", "status", "exception"), [
    (400, 400, openai.BadRequestError), (404, 404, openai.NotFoundError), (401, 502, openai.InternalServerError),
    (500, 500, openai.InternalServerError),
])  # fmt: skip
def test_an_upstream_http_error_keeps_its_status_except_a_refused_provider_key(
    rig: Rig, upstream: int, status: int, exception: type[openai.APIStatusError]
) -> None:
    with answering(rig, lambda b: http_error(upstream, f"upstream says {upstream}")):
        with pytest.raises(exception) as caught:
            client(rig).chat.completions.create(model="anthropic/m", messages=HI)
    assert caught.value.status_code == status and error_message(caught.value) == f"upstream says {upstream}"


def test_no_token_before_the_first_token_deadline_is_a_504(rig: Rig) -> None:
    with answering(rig, lambda b: Reply(200, "text/event-stream", [30.0])), \
         serve({**backend_env(rig.upstream.url), "FIRST_TOKEN_TIMEOUT_SECONDS": "0.3"}) as gw:  # fmt: skip
        api = closed_after_test(openai.OpenAI(base_url=gw.url + "/v1", api_key="-", max_retries=0))
        with pytest.raises(openai.APIStatusError) as caught:
            list(api.chat.completions.create(model="openai/m", messages=HI, stream=True))
    assert caught.value.status_code == 504 and "first-token deadline" in caught.value.message


@pytest.mark.parametrize("backend", UPSTREAM_BACKENDS)
def test_an_upstream_error_after_tokens_is_one_error_chunk_the_sdk_raises(rig: Rig, backend: str) -> None:
    received: list[str] = []
    with answering(rig, lambda b: failing_reply(b, ["par", "tial"], "the model fell over")):
        with pytest.raises(openai.APIError) as caught:
            for chunk in client(rig).chat.completions.create(model=f"{backend}/m", messages=HI, stream=True):
                received.append(chunk.choices[0].delta.content or "")
        assert "".join(received) == "partial" and caught.value.message == "the model fell over"
        # without stream, the whole answer failed: the upstream gave no status, so a 502
        with pytest.raises(openai.InternalServerError) as failed:
            client(rig).chat.completions.create(model=f"{backend}/m", messages=HI)
    assert failed.value.status_code == 502 and error_message(failed.value) == "the model fell over"


def test_the_error_chunk_is_the_last_thing_sent(rig: Rig) -> None:
    with answering(rig, lambda b: failing_reply(b, ["x"], "boom")), httpx.stream(
        "POST", rig.gw.url + "/v1/chat/completions", headers={"authorization": "Bearer gw-alice"},
        json={"model": "openai/m", "messages": HI, "stream": True}) as response:  # fmt: skip
        events = response.read().decode().split("\n\n")
    assert events[-1] == "" and json.loads(events[-2].removeprefix("data: ")) == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": "upstream_error"}}
    assert "[DONE]" not in "".join(events)


# --- leaving: the upstream stops at once, whatever the resume grace ------------------


@pytest.mark.parametrize("backend", UPSTREAM_BACKENDS)
def test_a_client_closing_mid_stream_cancels_the_upstream_at_once(rig: Rig, backend: str) -> None:
    with answering(rig, endless_reply):
        stream = client(rig).chat.completions.create(model=f"{backend}/m", messages=HI, stream=True)
        chunks = iter(stream)
        assert [next(chunks).choices[0].delta.content for _ in range(3)] == ["", "tick ", "tick "]
        closed_at = time.monotonic()
        stream.close()
        assert rig.upstream.wait_for(lambda: rig.seen[0].closed_by_client is not None, 10)  # RESUME_GRACE_SECONDS is 30
    assert rig.seen[0].closed_by_client is not None and rig.seen[0].closed_by_client - closed_at < 10


def test_a_client_leaving_before_the_first_token_cancels_the_upstream(rig: Rig) -> None:
    with answering(rig, lambda b: Reply(200, "text/event-stream", [60.0])):
        with pytest.raises(openai.APITimeoutError):
            client(rig, timeout=3).chat.completions.create(model="openai/m", messages=HI, stream=True)  # 3 s: time to reach the upstream
        assert rig.upstream.wait_for(lambda: bool(rig.seen) and rig.seen[0].closed_by_client is not None, 10)


def test_the_ledger_row_log_line_and_metrics_tell_the_route_and_the_disconnect(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asgi_stream")
    before = rig.gw.gateway.metrics.streams["anthropic", "cancelled"]
    with answering(rig, endless_reply):
        stream = client(rig).chat.completions.create(model="anthropic/claude-ledger", messages=HI, stream=True)
        next(iter(stream)), next(iter(stream))
        stream.close()
        assert rig.upstream.wait_for(lambda: "claude-ledger" in caplog.text, 10)
    line = json.loads(next(r.getMessage() for r in caplog.records if "claude-ledger" in r.getMessage()))
    assert (line["route"], line["key_name"], line["backend"]) == ("v1/chat/completions", "alice", "anthropic")
    assert line["client_disconnected"] == 1
    assert rig.gw.gateway.metrics.streams["anthropic", "cancelled"] == before + 1
    def row() -> Any:  # written just after the log line
        with sqlite3.connect(USAGE_DB) as db, suppress(sqlite3.OperationalError):  # no table before the first row
            return db.execute("SELECT key_name, finish_reason, client_disconnected FROM usage WHERE model = 'claude-ledger'").fetchone()
        return None

    assert rig.upstream.wait_for(lambda: row() is not None, 10) and row() == ("alice", "cancelled", 1)


def test_cors_headers_are_on_streams_answers_and_errors(rig: Rig) -> None:
    api = client(rig, default_headers={"origin": ORIGIN})
    streamed = api.chat.completions.with_raw_response.create(model="echo/echo", messages=HI, stream=True)
    assert streamed.headers["access-control-allow-origin"] == ORIGIN
    assert api.models.with_raw_response.list().headers["access-control-allow-origin"] == ORIGIN
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="echo/echo", messages=HI, n=3)
    assert caught.value.response.headers["access-control-allow-origin"] == ORIGIN


# --- the framing: exactly what both SDKs parse, heartbeats included --------------------


def test_the_stream_has_only_data_lines_and_comment_heartbeats(rig: Rig) -> None:
    """Slow tokens make the writer send heartbeats between chunks; both SDKs
    must read through them, and nothing but `data:` lines and comments is sent."""
    tokens = ["slow ", "and ", "steady"]
    with answering(rig, lambda b: tokens_reply(b, tokens, pause=0.3)), \
         serve({**backend_env(rig.upstream.url), "HEARTBEAT_SECONDS": "0.05"}) as gw:  # fmt: skip
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json={"model": "openai/m", "messages": HI, "stream": True}) as response:
            raw = response.read()
        api = closed_after_test(openai.OpenAI(base_url=gw.url + "/v1", api_key="-", max_retries=0))
        chunks = api.chat.completions.create(model="openai/m", messages=HI, stream=True)
        python_text = "".join(c.choices[0].delta.content or "" for c in chunks)
        (node,) = run_node(gw.url, "-", [{"request": {"model": "ollama/m", "messages": HI, "stream": True}}])
    lines = [line for line in raw.split(b"\n") if line]
    assert b":" in lines and all(line == b":" or line.startswith(b"data: {") or line == b"data: [DONE]" for line in lines)
    assert raw.endswith(b"data: [DONE]\n\n") and response.headers["content-type"].startswith("text/event-stream")
    assert python_text == node["text"] == "slow and steady" and "error" not in node


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(backend=st.sampled_from(ALL_BACKENDS), tokens=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=12),
       stream=st.booleans())  # fmt: skip
@example(backend="openai", tokens=["a\x85b", "\u2028", "\r\n", "data: x\n\n", "[DONE]", " "], stream=True)
@example(backend="gemini", tokens=["\u2029é", "\r", ": ping", "😀"], stream=True)
def test_the_sdk_reassembles_exactly_the_text_the_upstream_sent(rig: Rig, backend: str, tokens: list[str], stream: bool) -> None:
    text = "".join(tokens)
    messages = [{"role": "user", "content": text if backend == "echo" else "hi"}]
    with answering(rig, lambda b: tokens_reply(b, tokens)):
        if stream:
            chunks = client(rig).chat.completions.create(model=model_of(backend), messages=messages, stream=True)  # type: ignore[arg-type]
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            got = client(rig).chat.completions.create(model=model_of(backend), messages=messages).choices[0].message.content  # type: ignore[arg-type]
    assert got == text


# --- the openai npm package ---------------------------------------------------------------


def run_node(base_url: str, key: str, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if shutil.which("node") is None or not (NODE_CLIENT.parent / "node_modules" / "openai").exists():
        pytest.fail("needs node and `npm ci --prefix tests/node`")
    plan = json.dumps({"baseURL": base_url + "/v1", "apiKey": key, "cases": cases})
    done = subprocess.run(["node", str(NODE_CLIENT)], input=plan, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_node_sdk_streams_completes_and_uses_the_helper_on_every_backend(rig: Rig) -> None:
    cases = []
    for backend in ALL_BACKENDS:
        messages = [{"role": "user", "content": "Hi there" if backend == "echo" else "hi"}]
        base = {"model": model_of(backend), "messages": messages}
        cases += [{"request": {**base, "stream": True, "stream_options": {"include_usage": True}}},
                  {"request": base}, {"request": base, "helper": True}]  # fmt: skip
    with answering(rig, lambda b: tokens_reply(b, ["Hi", " there"])):
        results = run_node(rig.gw.url, "gw-alice", cases)
    for backend, (streamed, whole, helped) in zip(ALL_BACKENDS, [results[i : i + 3] for i in range(0, len(results), 3)], strict=True):
        assert (streamed["text"], streamed["roles"], streamed["finish"], streamed["ids"]) == ("Hi there", ["assistant"], "stop", 1), backend
        assert streamed["usage"]["total_tokens"] == (streamed["usage"]["prompt_tokens"] + streamed["usage"]["completion_tokens"])
        assert (whole["object"], whole["text"], whole["finish"]) == ("chat.completion", "Hi there", "stop"), backend
        assert (helped["text"], helped["finalText"], helped["finish"]) == ("Hi there", "Hi there", "stop"), backend


def test_node_sdk_raises_its_own_error_classes(rig: Rig) -> None:
    cases = [
        {"request": {"model": "echo/echo", "messages": HI, "tools": [{"type": "function"}]}},
        {"request": {"model": "nope/x", "messages": HI}},
        {"request": {"model": "gemini/m", "messages": HI, "stream": True}},  # upstream 429
        {"request": {"model": "ollama/m", "messages": HI, "stream": True}},  # fails after tokens
    ]
    with answering(rig, lambda b: http_error(429, "quota", "0") if b == "gemini" else failing_reply(b, ["so ", "far"], "broke")):
        tools, unknown, limited, broken = run_node(rig.gw.url, "gw-alice", cases)
        (unauthorized,) = run_node(rig.gw.url, "wrong", cases[:1])
    assert (tools["error"]["class"], tools["error"]["status"], tools["error"]["param"]) == ("BadRequestError", 400, "tools[0]")
    assert (unknown["error"]["class"], unknown["error"]["code"]) == ("NotFoundError", "model_not_found")
    assert (limited["error"]["class"], limited["error"]["status"]) == ("RateLimitError", 429) and "quota" in limited["error"]["message"]
    assert broken["text"] == "so far" and broken["error"]["class"] == "APIError" and "broke" in broken["error"]["message"]
    assert (unauthorized["error"]["class"], unauthorized["error"]["status"]) == ("AuthenticationError", 401)
