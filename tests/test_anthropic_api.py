"""Anthropic's Messages API as its users meet it: the official `anthropic`
SDK as the client of the gateway in a real uvicorn (and in-process on asyncio
and trio). echo plays thinking, a tool call and a tool result without a key;
a fake Anthropic upstream carries signed and redacted thinking, which must
come back to it unchanged on the next turn. Errors must be the SDK's own
exception classes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asgi_stream import Gateway
from tests.conftest import BASE_ENV, closed_after_test, serve
from tests.upstream import FakeUpstream, Reply, Seen

TOOLS: list[Any] = [{"name": "lookup", "description": "Look it up", "input_schema": {"type": "object"}}]
PROMPT = "weather in Paris"
THINKING: Any = {"type": "enabled", "budget_tokens": 1024}
ORIGIN = "https://app.example"
ENV = {"API_KEYS": "alice:k1", "CORS_ORIGINS": ORIGIN}
ECHO_REASONING = "The user said 3 words; I answer in kind."


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve(ENV) as served:
        yield served.url


def client(url: str, **options: Any) -> anthropic.Anthropic:
    return closed_after_test(anthropic.Anthropic(**{"base_url": url, "api_key": "k1", "max_retries": 0, "timeout": 30, **options}))


def history(message: Any) -> dict[str, Any]:
    """An answer appended to the conversation, as an agent loop does."""
    return {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in message.content]}


def tool_result(call_id: str, text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": [{"type": "text", "text": text}]}]}


# --- echo through a real server ------------------------------------------------------


def test_create_answers_with_one_message(url: str) -> None:
    message = client(url).messages.create(model="echo", max_tokens=100, messages=[{"role": "user", "content": "hello there"}])
    assert [(block.type, getattr(block, "text", None)) for block in message.content] == [("text", "hello there")]
    assert (message.stop_reason, message.model, message.role) == ("end_turn", "echo/echo", "assistant")
    assert message.id.startswith("msg_") and (message.usage.input_tokens, message.usage.output_tokens) == (2, 2)


def test_stream_ends_with_thinking_and_the_tool_use_input(url: str) -> None:
    with client(url).messages.stream(model="echo/echo", max_tokens=4096, thinking=THINKING, tools=TOOLS,
                                     messages=[{"role": "user", "content": PROMPT}]) as events:  # fmt: skip
        kinds = [event.type for event in events]
        final = events.get_final_message()
    assert {"message_start", "thinking", "input_json", "content_block_stop", "message_delta", "message_stop"} <= set(kinds)
    thinking, call = final.content
    assert thinking.type == "thinking" and thinking.thinking == ECHO_REASONING
    assert call.type == "tool_use" and (call.name, call.input, call.id) == ("lookup", {"text": PROMPT}, "call_echo0")
    assert (final.stop_reason, final.usage.output_tokens) == ("tool_use", 11)
    # Not streaming: the same content in one object.
    whole = client(url).messages.create(model="echo", max_tokens=4096, thinking=THINKING, tools=TOOLS,
                                        messages=[{"role": "user", "content": PROMPT}])  # fmt: skip
    assert [block.model_dump() for block in whole.content] == [block.model_dump() for block in final.content]


def test_a_two_turn_tool_loop(url: str) -> None:
    gateway = client(url)
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    with gateway.messages.stream(model="echo", max_tokens=4096, thinking=THINKING, tools=TOOLS, messages=messages) as events:
        first = events.get_final_message()
    call = first.content[-1]
    assert call.type == "tool_use"
    messages += [history(first), tool_result(call.id, "sunny, 21C")]
    with gateway.messages.stream(model="echo", max_tokens=4096, tools=TOOLS, messages=messages) as events:
        assert events.get_final_text() == "sunny, 21C"
        assert events.get_final_message().stop_reason == "end_turn"
    second = gateway.messages.create(model="echo", max_tokens=4096, tools=TOOLS, messages=messages)
    assert second.content[0].type == "text" and second.content[0].text == "sunny, 21C"


@pytest.mark.parametrize(
    ("choice", "kinds"),
    [({"type": "none"}, ["text"]), ({"type": "any"}, ["tool_use"]), ({"type": "tool", "name": "lookup", "disable_parallel_tool_use": True},
                                                                        ["tool_use"])],
)  # fmt: skip
def test_tool_choice(url: str, choice: Any, kinds: list[str]) -> None:
    message = client(url).messages.create(model="echo", max_tokens=100, tools=TOOLS, tool_choice=choice,
                                          messages=[{"role": "user", "content": PROMPT}])  # fmt: skip
    assert [block.type for block in message.content] == kinds


def test_system_blocks_images_and_stop_sequences(url: str) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    remote = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    message = client(url).messages.create(
        model="echo", max_tokens=100, system=[{"type": "text", "text": "be brief"}], stop_sequences=["STOP"], metadata={"user_id": "u1"},
        messages=[{"role": "user", "content": [image, remote, {"type": "text", "text": "what is this? STOP here"}]}],
    )  # fmt: skip
    assert message.content[0].type == "text" and message.content[0].text == "what is this? "


def test_what_claude_code_sends(url: str) -> None:
    """Claude Code 2.1 (run here against echo: it answered) sends system messages mid-conversation,
    adaptive thinking with output_config.effort, and beta fields the gateway ignores."""
    message = client(url).messages.create(
        model="echo", max_tokens=100, messages=[{"role": "user", "content": PROMPT}],
        extra_body={"messages": [{"role": "user", "content": PROMPT}, {"role": "system", "content": [{"type": "text", "text": "terse"}]}],
                    "thinking": {"type": "adaptive", "display": "omitted"}, "output_config": {"effort": "max"},
                    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}},
        extra_headers={"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"},
    )  # fmt: skip
    assert [block.type for block in message.content] == ["thinking", "text"] and message.content[1].text == PROMPT  # type: ignore[union-attr]


def test_count_tokens_is_an_estimate_and_says_so(url: str) -> None:
    counted = client(url).messages.count_tokens(model="echo", messages=[{"role": "user", "content": "x" * 400}], tools=TOOLS)
    assert counted.input_tokens > 100 and (counted.model_extra or {}).get("estimated") is True


def test_a_bearer_token_works_as_x_api_key_does(url: str) -> None:
    bearer = closed_after_test(anthropic.Anthropic(base_url=url, auth_token="k1", max_retries=0))
    assert bearer.messages.create(model="echo", max_tokens=5, messages=[{"role": "user", "content": "hi"}]).content[0].type == "text"


@pytest.mark.parametrize(
    "fields",
    [{"max_tokens": 0}, {"temperature": 1.5}, {"top_k": 5}, {"stop_sequences": ["a", "b", "c", "d", "e"]},
     {"thinking": {"type": "enabled"}},
     {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, {"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}},
     {"messages": [{"role": "tool", "content": "x"}]}, {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}],
)  # fmt: skip
def test_a_bad_field_is_the_sdks_bad_request_error(url: str, fields: dict[str, Any]) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:  # extra_body: fields this SDK has no parameter for, or types it would refuse
        client(url).messages.create(model="echo", max_tokens=100, messages=[{"role": "user", "content": "hi"}], extra_body=fields)
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_keys_and_backends_are_the_sdks_own_errors(url: str) -> None:
    hi: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.AuthenticationError):
        client(url, api_key="wrong").messages.create(model="echo", max_tokens=5, messages=hi)
    without = httpx.post(url + "/v1/messages", json={"model": "echo", "max_tokens": 5, "messages": hi})
    assert without.status_code == 401 and without.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as raised:
        client(url).messages.create(model="nope/model", max_tokens=5, messages=hi)
    assert raised.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):  # a backend whose key is not set here
        client(url).messages.stream(model="anthropic/claude-x", max_tokens=5, messages=hi).__enter__()


def test_a_browser_preflight_allows_the_sdks_headers(url: str) -> None:
    asked = "x-api-key, anthropic-version, anthropic-beta, content-type"
    answer = httpx.options(url + "/v1/messages", headers={"origin": ORIGIN, "access-control-request-method": "POST",
                                                          "access-control-request-headers": asked})  # fmt: skip
    assert answer.status_code == 204 and answer.headers["access-control-allow-headers"] == asked


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=120))
@example(prompt="a\u2028b\r\nc\x00 \U0001f600")
def test_the_text_the_sdk_accumulates_is_echos_text(url: str, prompt: str) -> None:
    with client(url).messages.stream(model="echo", max_tokens=1000, messages=[{"role": "user", "content": prompt}]) as events:
        final = events.get_final_message()  # get_final_text() refuses a message with no text block (an empty answer)
    assert "".join(block.text for block in final.content if block.type == "text") == prompt


# --- signed thinking through a fake Anthropic upstream ----------------------------------


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n".encode()


def anthropic_turn(*blocks: list[bytes], stop: str) -> Reply:
    usage = {"input_tokens": 7, "output_tokens": 1}
    start = {"message": {"id": "msg_up", "type": "message", "role": "assistant", "content": [], "usage": usage}}
    ending = [sse("message_delta", {"delta": {"stop_reason": stop}, "usage": {"output_tokens": 20}}), sse("message_stop", {})]
    return Reply(pieces=[sse("message_start", start), *(piece for block in blocks for piece in block), *ending])


def block(index: int, content: dict[str, Any], *deltas: dict[str, Any]) -> list[bytes]:
    return [sse("content_block_start", {"index": index, "content_block": content}),
            *(sse("content_block_delta", {"index": index, "delta": delta}) for delta in deltas),
            sse("content_block_stop", {"index": index})]  # fmt: skip


def anthropic_env(upstream: FakeUpstream) -> dict[str, str]:
    return {**ENV, "ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": upstream.url}


def signed_upstream(seen: Seen) -> Reply:
    """First turn: signed thinking, redacted thinking, a tool call; then the answer."""
    if seen.json["messages"][-1]["role"] == "user" and isinstance(seen.json["messages"][-1]["content"], str):
        return anthropic_turn(
            block(0, {"type": "thinking", "thinking": "", "signature": ""}, {"type": "thinking_delta", "thinking": "Let me "},
                  {"type": "thinking_delta", "thinking": "look."}, {"type": "signature_delta", "signature": "sig-A=="}),
            block(1, {"type": "redacted_thinking", "data": "opaque-B"}),
            block(2, {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}},
                  {"type": "input_json_delta", "partial_json": '{"text": '}, {"type": "input_json_delta", "partial_json": '"Paris"}'}),
            stop="tool_use",
        )  # fmt: skip
    return anthropic_turn(block(0, {"type": "text", "text": ""}, {"type": "text_delta", "text": "Sunny."}), stop="end_turn")


def test_signed_and_redacted_thinking_survive_the_round_trip() -> None:
    with FakeUpstream(signed_upstream) as upstream, serve(anthropic_env(upstream)) as gw:
        gateway, model = client(gw.url), "anthropic/claude-sonnet-4-5"
        messages: list[Any] = [{"role": "user", "content": PROMPT}]
        with gateway.messages.stream(model=model, max_tokens=4096, thinking=THINKING, tools=TOOLS, messages=messages) as events:
            first = events.get_final_message()
        by_type = {block.type: block for block in first.content}
        assert (by_type["thinking"].thinking, by_type["thinking"].signature) == ("Let me look.", "sig-A==")
        assert by_type["redacted_thinking"].data == "opaque-B" and by_type["tool_use"].input == {"text": "Paris"}
        assert first.stop_reason == "tool_use" and first.usage.output_tokens == 20
        messages += [history(first), tool_result("toolu_1", "sunny")]
        second = gateway.messages.create(model=model, max_tokens=4096, thinking=THINKING, tools=TOOLS, messages=messages)
        assert second.content[0].type == "text" and second.content[0].text == "Sunny."
        sent_back = upstream.seen[-1].json["messages"][1]["content"]
        assert sent_back[:2] == [{"type": "thinking", "thinking": "Let me look.", "signature": "sig-A=="},
                                 {"type": "redacted_thinking", "data": "opaque-B"}]  # fmt: skip
        assert sent_back[2] == {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"text": "Paris"}}
        assert upstream.seen[-1].json["thinking"]["type"] == "enabled"


def failing_upstream(seen: Seen) -> Reply:
    if "late" in json.dumps(seen.json["messages"]):
        text = block(0, {"type": "text", "text": ""}, {"type": "text_delta", "text": "partial"})
        return Reply(pieces=[*text[:2], sse("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})])
    body = json.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}).encode()
    return Reply(429, "application/json", [body], headers={"retry-after": "0"})


def test_upstream_failures_keep_their_status_or_end_the_stream_with_an_error_event() -> None:
    with FakeUpstream(failing_upstream) as upstream, serve(anthropic_env(upstream)) as gw:
        gateway, model = client(gw.url), "anthropic/claude-sonnet-4-5"
        with pytest.raises(anthropic.RateLimitError):
            gateway.messages.create(model=model, max_tokens=50, messages=[{"role": "user", "content": "now"}])
        with pytest.raises(anthropic.APIStatusError) as raised:
            with gateway.messages.stream(model=model, max_tokens=50, messages=[{"role": "user", "content": "late"}]) as events:
                for _ in events:
                    pass
        assert raised.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


DEEP_ARGUMENTS = '{"a": ' * 1000 + "{}" + "}" * 1000  # JSON text orjson reads (1,024 levels) but writes only 254 of


def deep_arguments_upstream(seen: Seen) -> Reply:
    call = block(0, {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}},
                 {"type": "input_json_delta", "partial_json": DEEP_ARGUMENTS})  # fmt: skip
    return anthropic_turn(call, stop="tool_use")


def test_tool_arguments_nested_past_what_json_writes_stay_whole_as_text() -> None:
    # the non-streaming answer parses a call's arguments into its input; these it could not write: kept as text,
    # like arguments that are no JSON object
    with FakeUpstream(deep_arguments_upstream) as upstream, serve(anthropic_env(upstream)) as gw:
        message = client(gw.url).messages.create(model="anthropic/claude-sonnet-4-5", max_tokens=50, tools=TOOLS,
                                                 messages=[{"role": "user", "content": "now"}])  # fmt: skip
        call = message.content[0]
        assert (call.type, message.stop_reason, call.input) == ("tool_use", "tool_use", {"arguments": DEEP_ARGUMENTS})


# --- in-process, on asyncio and trio ------------------------------------------------------


@pytest.mark.anyio
async def test_the_async_sdk_runs_the_tool_loop_in_process() -> None:
    app = Gateway({**BASE_ENV, **ENV})
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway") as http:
        gateway = anthropic.AsyncAnthropic(base_url="http://gateway", api_key="k1", max_retries=0, http_client=http)
        messages: list[Any] = [{"role": "user", "content": PROMPT}]
        async with gateway.messages.stream(model="echo", max_tokens=4096, thinking=THINKING, tools=TOOLS, messages=messages) as events:
            first = await events.get_final_message()
        assert [block.type for block in first.content] == ["thinking", "tool_use"]
        messages += [history(first), tool_result(first.content[1].id, "sunny")]  # type: ignore[union-attr]
        second = await gateway.messages.create(model="echo", max_tokens=4096, tools=TOOLS, messages=messages)
        assert second.content[0].type == "text" and second.content[0].text == "sunny"
