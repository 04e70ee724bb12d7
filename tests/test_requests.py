"""Start-stream requests as pure functions: `parse_chat_request` for the three
request forms and every validation rule of docs/design.md "Start a stream", and
the body reader (`read_body`, `is_json_media_type`)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_stream_core.chat_request import parse_chat_request
from asgi_stream_core.config import Config, load_config
from asgi_stream_core.types import ClientGone, Refusal
from asgi_stream_core.web import is_json_media_type, read_body
from providers import ChatRequest

ECHO_ONLY = load_config({})
WITH_OPENAI = load_config({"OPENAI_API_KEY": "sk-test", "DEFAULT_BACKEND": "echo"})
HI = [{"role": "user", "content": "hi"}]


def post(body: Any, query: str = "", config: Config = WITH_OPENAI) -> ChatRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_chat_request("POST", dict(parse_qsl(query, keep_blank_values=True)), raw, config)


def get(query: dict[str, str], config: Config = WITH_OPENAI) -> ChatRequest:
    return parse_chat_request("GET", dict(parse_qsl(urlencode(query), keep_blank_values=True)), b"", config)


def refusal(call: Callable[[], Any]) -> str:
    """The message of the 400 invalid_request that `call` must raise."""
    with pytest.raises(Refusal) as caught:
        call()
    assert (caught.value.status, caught.value.type) == (400, "invalid_request")
    return caught.value.message


# --- the three forms -------------------------------------------------------------


def test_post_object_form_carries_every_field() -> None:
    request = post({"messages": HI, "backend": "openai", "model": "gpt-x", "max_tokens": 7, "temperature": 0.5})
    assert request == ChatRequest(HI, "openai", "gpt-x", 7, 0.5)


def test_post_bare_array_form_takes_its_fields_from_the_query() -> None:
    request = post(HI, "backend=openai&model=openai/gpt-4o&max_tokens=64&temperature=1.5")
    assert request == ChatRequest(HI, "openai", "openai/gpt-4o", 64, 1.5)


def test_get_prompt_becomes_one_user_message() -> None:
    request = get({"prompt": "Hello\nthere ", "backend": "openai", "max_tokens": "3"})
    assert request == ChatRequest([{"role": "user", "content": "Hello\nthere "}], "openai", "gpt-4o-mini", 3, None)


def test_get_messages_is_a_json_array() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert get({"messages": json.dumps(messages)}).messages == messages


def test_get_with_prompt_and_messages_is_refused() -> None:
    assert "prompt or messages" in refusal(lambda: get({"prompt": "a", "messages": json.dumps(HI)}))


def test_get_without_prompt_or_messages_is_refused() -> None:
    assert "prompt" in refusal(lambda: get({"backend": "echo"}))


def test_get_messages_that_is_not_json_is_refused_naming_messages() -> None:
    assert refusal(lambda: get({"messages": "[{"})).startswith("messages is not valid JSON")


def test_body_fields_win_over_query_parameters() -> None:
    request = post({"messages": HI, "backend": "echo", "model": "m1", "max_tokens": 5, "temperature": 0},
                   "backend=openai&model=m2&max_tokens=9&temperature=2")
    assert request == ChatRequest(HI, "echo", "m1", 5, 0.0)


def test_query_parameters_fill_what_the_body_object_leaves_out_or_nulls() -> None:
    request = post({"messages": HI, "max_tokens": None}, "backend=openai&max_tokens=9")
    assert (request.backend, request.max_tokens) == ("openai", 9)


def test_defaults_come_from_the_configuration() -> None:
    config = load_config({"MAX_TOKENS": "33", "DEFAULT_MODEL": "my-echo"})
    request = post({"messages": HI}, config=config)
    assert request == ChatRequest(HI, "echo", "my-echo", 33, None)


def test_default_model_applies_only_to_the_default_backend() -> None:
    config = load_config({"OPENAI_API_KEY": "k", "DEFAULT_BACKEND": "echo", "DEFAULT_MODEL": "my-echo"})
    assert post({"messages": HI, "backend": "openai"}, config=config).model == "gpt-4o-mini"
    assert post({"messages": HI}, config=config).model == "my-echo"


def test_unknown_message_fields_are_ignored_and_not_passed_on() -> None:
    request = post({"messages": [{"role": "user", "content": "hi", "name": "bob", "x": [1]}], "extra": 1})
    assert request.messages == HI


# --- bodies that are not requests --------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"{", b"nope", b"\xff", b'{"messages": [}'])
def test_a_body_that_is_not_json_is_refused(body: bytes) -> None:
    assert refusal(lambda: post(body)).startswith("the request body is not valid JSON")


@pytest.mark.parametrize("body", ["hi", 5, None, True])
def test_a_body_that_is_neither_object_nor_array_is_refused(body: Any) -> None:
    assert "JSON object or an array of messages" in refusal(lambda: post(body))


def test_an_object_without_messages_is_refused_naming_messages() -> None:
    assert refusal(lambda: post({"prompt": "hi"})) == "messages is required"


# --- messages ----------------------------------------------------------------------


@pytest.mark.parametrize("messages", [[], {}, "hi", None, 5, {"role": "user", "content": "hi"}])
def test_messages_must_be_a_non_empty_array(messages: Any) -> None:
    assert refusal(lambda: post({"messages": messages})).startswith("messages must be a non-empty array")


@pytest.mark.parametrize("item", ["hi", 5, None, ["user", "hi"]])
def test_each_message_must_be_an_object(item: Any) -> None:
    assert refusal(lambda: post({"messages": [*HI, item]})).startswith("messages[1] must be an object")


@pytest.mark.parametrize("role", [None, "User", "", 1, "critic"])
def test_roles_are_system_user_assistant(role: Any) -> None:
    message = refusal(lambda: post({"messages": [{"role": role, "content": "x"}]}))
    assert message.startswith("messages[0].role must be one of system, user, assistant")


def test_a_tool_result_names_its_call_and_developer_is_system() -> None:
    message = refusal(lambda: post({"messages": [{"role": "tool", "content": "42"}]}))
    assert message.startswith("messages[0].tool_call_id must name the call")
    tool = {"role": "tool", "content": "42", "tool_call_id": "call_1"}
    assert post({"messages": [tool]}).messages == [tool]
    assert post({"messages": [{"role": "developer", "content": "be brief"}]}).messages == [{"role": "system", "content": "be brief"}]


@pytest.mark.parametrize("role", ["system", "user", "assistant"])
def test_every_role_is_accepted(role: str) -> None:
    assert post({"messages": [{"role": role, "content": ""}]}).messages == [{"role": role, "content": ""}]


@pytest.mark.parametrize("content", [None, 5, {"text": "a"}, True])
def test_content_must_be_a_string(content: Any) -> None:
    message = refusal(lambda: post({"messages": [{"role": "user", "content": content}]}))
    assert message.startswith("messages[0].content must be a string")


def test_a_long_wrong_value_is_shown_shortened() -> None:
    message = refusal(lambda: post({"messages": [{"role": "x" * 100, "content": "a"}]}))
    shown = message.split("got ", 1)[1]
    assert shown == '"' + "x" * 36 + "..." and len(shown) == 40


# --- max_tokens ----------------------------------------------------------------------


@given(st.integers(1, 8192))
def test_max_tokens_from_1_to_the_limit_is_taken_as_is(max_tokens: int) -> None:
    assert post({"messages": HI, "max_tokens": max_tokens}).max_tokens == max_tokens
    assert post(HI, f"max_tokens={max_tokens}").max_tokens == max_tokens


@given(st.one_of(st.integers(min_value=-(2**63), max_value=0), st.integers(min_value=8193, max_value=2**64 - 1)))
def test_max_tokens_out_of_range_is_refused_never_clamped(max_tokens: int) -> None:
    assert refusal(lambda: post({"messages": HI, "max_tokens": max_tokens})).startswith("max_tokens must be from 1 to 8192")


def test_max_tokens_beyond_64_bits_is_refused_naming_max_tokens() -> None:
    body = b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1' + b"0" * 30 + b"}"
    assert refusal(lambda: post(body)).startswith("max_tokens must be")


def test_max_tokens_limit_comes_from_the_configuration() -> None:
    config = load_config({"MAX_TOKENS_LIMIT": "10"})
    assert post({"messages": HI, "max_tokens": 10}, config=config).max_tokens == 10
    assert "from 1 to 10, got 11" in refusal(lambda: post({"messages": HI, "max_tokens": 11}, config=config))


@pytest.mark.parametrize("value", [True, False, 5.0, 5.5, "5", [5], {"n": 5}])
def test_max_tokens_of_another_json_type_is_refused(value: Any) -> None:
    assert refusal(lambda: post({"messages": HI, "max_tokens": value})).startswith("max_tokens must be an integer")


@pytest.mark.parametrize("value", ["", "abc", "-1", "+5", "1.5", " 5", "5 ", "1e3", "٣", "0x10"])
def test_max_tokens_query_parameter_must_be_decimal_digits(value: str) -> None:
    assert refusal(lambda: post(HI, urlencode({"max_tokens": value}))).startswith("max_tokens must be an integer")


def test_max_tokens_query_parameter_zero_is_out_of_range() -> None:
    assert refusal(lambda: get({"prompt": "x", "max_tokens": "0"})).startswith("max_tokens must be from 1")


# --- temperature ----------------------------------------------------------------------


@given(st.one_of(st.floats(0, 2), st.integers(0, 2)))
def test_temperature_from_0_to_2_is_a_float(temperature: float) -> None:
    request = post({"messages": HI, "temperature": temperature})
    assert request.temperature == temperature and type(request.temperature) is float


@given(st.one_of(st.floats(max_value=-1e-9, allow_infinity=False), st.floats(min_value=2.000001, allow_infinity=False),
                 st.integers(min_value=3, max_value=2**63), st.integers(min_value=-(2**63), max_value=-1)))
def test_temperature_out_of_range_is_refused(temperature: float) -> None:
    assert refusal(lambda: post({"messages": HI, "temperature": temperature})).startswith("temperature must be from 0 to 2")


@pytest.mark.parametrize("value", [True, "0.5", [0.5]])
def test_temperature_of_another_json_type_is_refused(value: Any) -> None:
    assert refusal(lambda: post({"messages": HI, "temperature": value})).startswith("temperature must be a number")


OUT_OF_RANGE = "temperature must be from 0 to 2"


@pytest.mark.parametrize(("value", "start"), [("hot", "temperature must be a number"), ("nan", OUT_OF_RANGE),
                                               ("inf", OUT_OF_RANGE), ("-0.5", OUT_OF_RANGE)])
def test_temperature_query_parameter_is_parsed_and_checked(value: str, start: str) -> None:
    assert refusal(lambda: get({"prompt": "x", "temperature": value})).startswith(start)


def test_temperature_query_parameter_in_range_is_taken() -> None:
    assert get({"prompt": "x", "temperature": "0.25"}).temperature == 0.25


# --- model ----------------------------------------------------------------------------

MODEL_CHARS = "ABCXYZabcxyz0123456789._-:/@+"


@given(st.text(st.sampled_from("Aa0"), min_size=1, max_size=1), st.text(st.sampled_from(MODEL_CHARS), max_size=255))
def test_model_names_of_the_allowed_characters_are_accepted(first: str, rest: str) -> None:
    assert post({"messages": HI, "model": first + rest}).model == first + rest


@pytest.mark.parametrize("model", ["a" * 257, "-a", ".a", "/a", ":a", "a b", "a\nb", "gpt-4o?x", "é", "a#b", "a\0"])
def test_model_names_outside_the_pattern_are_refused(model: str) -> None:
    assert refusal(lambda: post({"messages": HI, "model": model})).startswith("model ")
    assert "is not a valid model name for openai" in refusal(lambda: post({"messages": HI, "model": model, "backend": "openai"}))


@pytest.mark.parametrize("model", [5, True, ["gpt"], {"m": 1}])
def test_model_of_another_json_type_is_refused(model: Any) -> None:
    assert refusal(lambda: post({"messages": HI, "model": model})).startswith("model must be a string")


def test_typical_model_names_pass() -> None:
    for model in ["llama3.2:latest", "openai/gpt-4o", "gpt-4o-mini", "claude-3-5-haiku@20241022", "a+b"]:
        assert post({"messages": HI, "model": model}).model == model


# --- backend ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["nope", "OPENAI", "echo ", "-"])
def test_an_unknown_backend_is_refused_naming_the_known_ones(backend: str) -> None:
    assert refusal(lambda: post({"messages": HI, "backend": backend})).startswith("backend must be one of echo, openai")


def test_a_known_but_unconfigured_backend_is_refused_naming_its_key_variable() -> None:
    message = refusal(lambda: post({"messages": HI, "backend": "openai"}, config=ECHO_ONLY))
    assert message.startswith("backend 'openai' is not configured") and "(OPENAI_API_KEY is not set)" in message


@pytest.mark.parametrize("backend", [5, True, ["echo"]])
def test_backend_of_another_json_type_is_refused(backend: Any) -> None:
    assert refusal(lambda: post({"messages": HI, "backend": backend})).startswith("backend must be a string")


def test_query_backend_is_used_by_the_get_form() -> None:
    assert get({"prompt": "x", "backend": "openai", "model": "m"}).backend == "openai"
    assert "OPENAI_API_KEY" in refusal(lambda: get({"prompt": "x", "backend": "openai"}, config=ECHO_ONLY))


# --- media type -------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=utf-8", " application/json ;x=y",
                                          "application/vnd.api+json", "application/ld+json; charset=UTF-8"])
def test_json_media_types_are_json(content_type: str) -> None:
    assert is_json_media_type(content_type)


@pytest.mark.parametrize("content_type", ["", "text/plain", "text/json", "application/jsonx", "application/json-seq",
                                          "application/x-www-form-urlencoded", "multipart/form-data", "json", "+json"])
def test_other_media_types_are_not_json(content_type: str) -> None:
    assert not is_json_media_type(content_type)


# --- reading the body ---------------------------------------------------------------------

SMALL = load_config({"MAX_BODY_BYTES": "10", "BODY_TIMEOUT_SECONDS": "0.05"})


class Body:
    """A receive() that hands out body pieces and counts how many were taken."""

    def __init__(self, *pieces: bytes, then: dict[str, Any] | None = None) -> None:
        self.messages: list[dict[str, Any]] = [
            {"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1} for i, piece in enumerate(pieces)
        ]
        if then is not None:
            self.messages[-1]["more_body"] = True
            self.messages.append(then)
        self.taken = 0

    async def __call__(self) -> dict[str, Any]:
        if self.taken == len(self.messages):
            await anyio.sleep_forever()
        self.taken += 1
        return self.messages[self.taken - 1]


async def read(receive: Callable[[], Awaitable[dict[str, Any]]], headers: dict[str, str] | None = None) -> bytes:
    return await read_body(receive, headers or {}, SMALL)


@pytest.mark.anyio
async def test_read_body_joins_the_pieces() -> None:
    assert await read(Body(b"12", b"", b"345", b"67890")) == b"1234567890"


@pytest.mark.anyio
async def test_read_body_takes_a_message_without_body_key_as_empty() -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    assert await read(receive) == b""


@pytest.mark.anyio
async def test_read_body_refuses_a_declared_length_over_the_limit_without_reading() -> None:
    body = Body(b"x")
    with pytest.raises(Refusal) as caught:
        await read(body, {"content-length": "11"})
    assert (caught.value.status, caught.value.type) == (413, "payload_too_large")
    assert "10 bytes" in caught.value.message
    assert body.taken == 0


@pytest.mark.anyio
async def test_read_body_stops_reading_as_soon_as_the_limit_is_passed() -> None:
    body = Body(b"123456", b"78901", b"never read", b"nor this")
    with pytest.raises(Refusal) as caught:
        await read(body, {"content-length": "bogus"})
    assert caught.value.status == 413
    assert body.taken == 2


@pytest.mark.anyio
async def test_read_body_accepts_exactly_the_limit() -> None:
    assert await read(Body(b"12345", b"67890"), {"content-length": "10"}) == b"1234567890"


@pytest.mark.anyio
async def test_read_body_raises_client_gone_on_disconnect() -> None:
    with pytest.raises(ClientGone):
        await read(Body(b"12", then={"type": "http.disconnect"}))


@pytest.mark.anyio
async def test_read_body_answers_408_when_the_body_stalls() -> None:
    with pytest.raises(Refusal) as caught:
        await read(Body(b"12", then={"type": "http.request", "body": b"3", "more_body": True}))
    assert (caught.value.status, caught.value.type) == (408, "request_timeout")
    assert "0.05 s" in caught.value.message
