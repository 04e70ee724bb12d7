"""openai_api's pure parts: an OpenAI request body to a ChatRequest (or a
400/404 naming the field), and chunks framed so that an SSE parser gives
back exactly the JSON, whatever the token."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from httpx_sse._decoders import SSEDecoder
from hypothesis import given
from hypothesis import strategies as st

from asgi_stream_core import config, openai_api
from asgi_stream_core.openai_api import parse_completion_request
from asgi_stream_core.record import StreamRecord
from asgi_stream_core.types import Refusal
from providers import UpstreamError

CONFIG = config.load_config({"OPENAI_API_KEY": "k", "OLLAMA_BASE_URL": "http://127.0.0.1:1", "MAX_TOKENS": "100"})
HI = [{"role": "user", "content": "hi"}]


def parse(**fields: Any) -> openai_api.Completion:
    body = json.dumps({"model": "echo/echo", "messages": HI, **fields}).encode()  # json: any integer, unlike orjson
    return parse_completion_request(body, CONFIG)


def refusal(**fields: Any) -> Refusal:
    with pytest.raises(Refusal) as caught:
        parse(**fields)
    return caught.value


def test_a_full_request_becomes_the_chat_request_providers_take() -> None:
    completion = parse(model="ollama/llama3.2:latest", max_tokens=9, temperature=1, top_p=0, stop="x", stream=True,
                       stream_options={"include_usage": True})  # fmt: skip
    request = completion.request
    assert (request.backend, request.model, request.max_tokens, request.temperature, request.top_p, request.stop) == (
        "ollama", "llama3.2:latest", 9, 1.0, 0.0, ["x"])  # fmt: skip
    assert (completion.model, completion.stream, completion.include_usage) == ("ollama/llama3.2:latest", True, True)


def test_defaults_and_include_usage_only_with_stream() -> None:
    completion = parse(stream_options={"include_usage": True})
    assert (completion.request.max_tokens, completion.stream, completion.include_usage) == (100, False, False)
    assert parse(model="gpt-x").request.backend == CONFIG.default_backend == "openai"
    assert parse(model="openai/org/model-1").request.model == "org/model-1"
    assert parse(stop=[]).request.stop is None and parse(max_tokens=5, max_completion_tokens=7).request.max_tokens == 7


@pytest.mark.parametrize(("fields", "param", "status"), [
    ({"model": None}, "model", 400), ({"model": ""}, "model", 400), ({"model": 7}, "model", 400),
    ({"model": "anthropic/claude"}, "model", 404), ({"model": "x/y"}, "model", 404),
    ({"messages": "hi"}, "messages", 400), ({"messages": ["hi"]}, "messages[0]", 400),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", 400),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text", 400),
    ({"messages": [{"role": "user", "content": ["bare string part"]}]}, "messages[0].content[0]", 400),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c"}]}]}, "messages[0].tool_calls[0]", 400),
    ({"messages": [{"role": "function", "content": "1", "name": "f"}]}, "messages[0]", 400),
    ({"stream_options": 1}, "stream_options", 400), ({"stream": True, "stream_options": {"include_usage": 1}}, "include_usage", 400),
    ({"n": 0}, "n", 400), ({"n": True}, "n", 400), ({"n": 1.5}, "n", 400), ({"top_logprobs": 2}, "top_logprobs", 400),
    ({"function_call": "auto"}, "function_call", 400), ({"max_tokens": True}, "max_tokens", 400),
    ({"temperature": True}, "temperature", 400), ({"temperature": "1"}, "temperature", 400), ({"stop": 5}, "stop", 400),
])  # fmt: skip
def test_refusals_name_the_field(fields: dict[str, Any], param: str, status: int) -> None:
    error = refusal(**fields)
    assert (error.param, error.status) == (param, status) and error.message
    body = json.loads(openai_api.error_body(error))["error"]
    assert body["param"] == param and body["code"] == error.type and body["message"] == error.message


def test_values_too_deep_to_show_are_named_by_their_type() -> None:
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    assert openai_api.shown(deep) == "list"
    with pytest.raises(Refusal, match="messages must be a non-empty array"):
        parse_completion_request(b'{"model": "echo/echo", "messages": 5}', CONFIG)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
       st.sampled_from(["model", "messages", "stream", "stop", "n", "max_tokens", "top_p", "tools", "response_format"]))  # fmt: skip
def test_any_json_in_any_field_is_accepted_or_refused_never_a_crash(value: Any, field: str) -> None:
    try:
        parse(**{field: value})
    except Refusal as error:
        assert error.status in (400, 404) and error.message


@pytest.mark.parametrize(("status", "kind", "expected"), [
    (429, "upstream_error", 429), (400, "upstream_error", 400), (401, "upstream_error", 502), (403, "upstream_error", 502),
    (None, "timeout", 504), (None, "shutdown", 503), (None, "protocol_error", 502), (200, "upstream_error", 502),
])  # fmt: skip
def test_an_upstream_failure_answers_with_its_status_or_ours(status: int | None, kind: str, expected: int) -> None:
    assert openai_api.upstream_status(UpstreamError(kind, "m", status)) == expected


@pytest.mark.parametrize(("asked", "allowed"), [
    ("authorization,content-type,x-stainless-os", b"authorization,content-type,x-stainless-os"),
    ("", b"Authorization, Content-Type"), ("bad header\r\nx: y", b"Authorization, Content-Type"),
])  # fmt: skip
def test_the_preflight_allows_header_names_the_browser_asks_for(asked: str, allowed: bytes) -> None:
    assert openai_api.allowed_headers({"access-control-request-headers": asked}) == allowed


async def new_record(completion: openai_api.Completion) -> StreamRecord:
    return openai_api.completion_record(None, completion)  # it reads the event loop's clock


def sse_data(body: bytes) -> list[str]:
    decoder = SSEDecoder()
    events = [decoder.decode(line.decode()) for line in body.split(b"\n")]
    return [e.data for e in events if e is not None]


@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), min_size=1), max_size=8),
       st.sampled_from(["stop", "length"]), st.booleans())  # fmt: skip
def test_framed_chunks_give_back_each_token_and_the_ending(tokens: list[str], reason: str, include_usage: bool) -> None:
    record = anyio.run(new_record, parse(stream=True, stream_options={"include_usage": include_usage}))
    for token in tokens:
        record.append("token", token)
    record.finish(reason, {"prompt_tokens": 1, "completion_tokens": len(tokens), "total_tokens": 1 + len(tokens), "estimated": True}, None)
    record.finish("stop", None, None)  # once only
    framed = record.opening() + record.read(0)
    assert not any(raw in framed for raw, _ in openai_api.UNICODE_LINE_BREAKS)
    assert framed.decode().splitlines() == framed.decode().split("\n")[:-1]  # no line break but LF
    data = sse_data(framed)
    *chunks, done = [json.loads(d) if d != "[DONE]" else d for d in data]
    assert done == "[DONE]" and "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "".join(tokens)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == reason
    assert [c["usage"] for c in chunks if not c["choices"]] == ([{"prompt_tokens": 1, "completion_tokens": len(tokens),
                                                                  "total_tokens": 1 + len(tokens)}] if include_usage else [])  # fmt: skip
    assert record.count == len(tokens) + 2 and record.read(record.count) == b""  # tokens, then usage and done: one log under every framer


def test_a_lone_surrogate_is_replaced_not_a_crash() -> None:
    frame = openai_api.frame_completion_chunk({"id": "x"}, {"content": "a\ud800b"}, None)
    assert json.loads(frame[6:])["choices"][0]["delta"]["content"] == "a?b"
