"""The OpenAI-compatible backend beyond text: reasoning (both field names),
tool calls (a name after its id, parallel calls interleaved), OpenRouter's
`reasoning_details` and the DeepSeek round trip. Each transcript is in the
real wire format, served over a real socket, and checked first against
openai-python's own stream accumulator as the oracle; then through the
gateway on /chat/stream and /v1."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers import ChatRequest, Upstream
from providers.openai import build_request
from tests.rig import Rig, rig_fixture  # noqa: F401
from tests.upstream import FakeUpstream, Reply, Seen

GATEWAY_ENV = {"MAX_TOKENS_LIMIT": "4096"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]  # fmt: skip
ASK = [{"role": "user", "content": "Weather in Paris and Tokyo?"}]
HEAD = {"id": "chatcmpl-7f3a", "object": "chat.completion.chunk", "created": 1765000000, "model": "deepseek-reasoner"}


def chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body: dict[str, Any] = {**HEAD, "system_fingerprint": "fp_ds", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt: int, completion: int, reasoning: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning}}  # fmt: skip


def reply(*pieces: bytes) -> Reply:
    return Reply(pieces=[*pieces, b"data: [DONE]\n\n"])


# --- the transcripts -------------------------------------------------------------------

# DeepSeek (thinking mode, a tool call): reasoning_content deltas with content null,
# then one call whose id comes first and whose name comes in the next chunk.
DEEPSEEK_ARGS = '{"city": "Paris"}'
DEEPSEEK = reply(
    chunk({"role": "assistant", "content": None, "reasoning_content": ""}),
    chunk({"content": None, "reasoning_content": "The user wants"}),
    chunk({"content": None, "reasoning_content": " the weather."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_00_Qx7", "type": "function", "function": {"arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"name": "get_weather"}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
    chunk({"content": None}, "tool_calls"),
    chunk(None, usage=usage(20, 30, 12)),
)

# OpenRouter (Claude with reasoning): `reasoning` beside `reasoning_details`
# fragments of one index, the signature once at the end, then the answer.
SIGNATURE = "EqQBCkgIARABGAIiQL3kz+/sig=="
OPENROUTER = reply(
    chunk({"role": "assistant", "content": "", "reasoning": "Think",
           "reasoning_details": [{"type": "reasoning.text", "text": "Think", "format": "anthropic-claude-v1", "index": 0}]}),
    chunk({"role": "assistant", "content": "", "reasoning": "ing hard.",
           "reasoning_details": [{"type": "reasoning.text", "text": "ing hard.", "format": "anthropic-claude-v1", "index": 0}]}),
    chunk({"role": "assistant", "content": "", "reasoning": "",
           "reasoning_details": [{"type": "reasoning.text", "signature": SIGNATURE, "format": "anthropic-claude-v1", "index": 0}]}),
    chunk({"role": "assistant", "content": "It is"}),
    chunk({"role": "assistant", "content": " sunny."}),
    chunk({"role": "assistant", "content": ""}, "stop"),
    chunk(None, usage=usage(10, 40, 25)),
)  # fmt: skip

# Two calls at once, their fragments interleaved (OpenAI's parallel tool calls).
PARALLEL_ARGS = ['{"city": "Paris"}', '{"city": "Tokyo"}']
PARALLEL = reply(
    chunk({"role": "assistant", "content": None, "refusal": None}),
    chunk({"tool_calls": [{"index": 0, "id": "call_A1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "call_B2", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"city"'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": ': "Tokyo"}'}}]}),
    chunk({}, "tool_calls"),
    chunk(None, usage=usage(30, 24, 0)),
)

# What each transcript says, as a client should end up with it.
EXPECTED = {
    "deepseek": {"reasoning": "The user wants the weather.", "content": "", "finish": "tool_calls", "reasoning_tokens": 12,
                 "calls": [("call_00_Qx7", "get_weather", DEEPSEEK_ARGS)]},
    "openrouter": {"reasoning": "Thinking hard.", "content": "It is sunny.", "finish": "stop", "reasoning_tokens": 25, "calls": []},
    "parallel": {"reasoning": "", "content": "", "finish": "tool_calls", "reasoning_tokens": None,
                 "calls": [("call_A1", "get_weather", PARALLEL_ARGS[0]), ("call_B2", "get_weather", PARALLEL_ARGS[1])]},
}  # fmt: skip
TRANSCRIPTS = {"deepseek": DEEPSEEK, "openrouter": OPENROUTER, "parallel": PARALLEL}


def sdk_at(url: str) -> openai.OpenAI:
    """An SDK client (use it in a `with`: its connections are closed at the end)."""
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)


CLIENTS: dict[str, openai.OpenAI] = {}


def gateway_sdk(rig: Rig) -> openai.OpenAI:
    """The module's one SDK client of the gateway (closed with the module)."""
    return CLIENTS.setdefault(rig.gw.url, sdk_at(rig.gw.url))


@pytest.fixture(scope="module", autouse=True)
def close_clients() -> Iterator[None]:
    yield
    for client in CLIENTS.values():
        client.close()
    CLIENTS.clear()


def reasoning_of(message: Any) -> str:
    extra = message.model_extra or {}
    return str(extra.get("reasoning_content") or extra.get("reasoning") or "")


def calls_of(message: Any) -> list[tuple[str, str, str]]:
    return [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]


# --- the oracle: openai-python against the transcripts themselves ----------------------


@pytest.mark.parametrize("name", list(TRANSCRIPTS))
def test_the_transcripts_mean_what_we_expect_to_openai_python(name: str) -> None:
    expected = EXPECTED[name]
    with FakeUpstream(lambda seen: TRANSCRIPTS[name]) as upstream:
        with sdk_at(upstream.url) as sdk, sdk.chat.completions.stream(model="m", messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
                                                                      stream_options={"include_usage": True}) as s:
            final = s.get_final_completion()
    message = final.choices[0].message
    assert calls_of(message) == expected["calls"]
    assert (message.content or "") == expected["content"] and final.choices[0].finish_reason == expected["finish"]
    # DeepSeek's field is reasoning_content, OpenRouter's is reasoning: the SDK keeps each as sent
    assert reasoning_of(message) == expected["reasoning"]
    if name == "openrouter":  # the SDK joins every string of an index; text and the signature (sent once) come out right
        (detail,) = (message.model_extra or {})["reasoning_details"]
        assert (detail["type"], detail["text"], detail["signature"]) == ("reasoning.text", "Thinking hard.", SIGNATURE)


# --- through the gateway ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(TRANSCRIPTS))
def test_chat_stream_has_reasoning_tool_call_events_the_message_and_done(rig: Rig, name: str) -> None:
    expected = EXPECTED[name]
    rig.reset(TRANSCRIPTS[name])
    result = rig.chat("openai", ASK, tools=TOOLS)  # type: ignore[arg-type]
    assert result.status == 200, result.body
    assert "".join(result.of("reasoning")) == expected["reasoning"] and result.text == expected["content"]
    assert result.of("done") == [expected["finish"]]
    pieces = [json.loads(d) for d in result.of("tool_call")]
    firsts = [p for p in pieces if "id" in p]
    assert [(p["id"], p["name"]) for p in firsts] == [(i, n) for i, n, _ in expected["calls"]]
    assert all(p["name"] for p in firsts)  # a call's first event waited for its name
    joined = {i: "".join(p["arguments"] for p in pieces if p["index"] == i) for i in range(len(expected["calls"]))}
    assert [joined[i] for i in range(len(expected["calls"]))] == [a for _, _, a in expected["calls"]]
    (message,) = [json.loads(d) for d in result.of("message")]
    assert message.get("reasoning_content", "") == expected["reasoning"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])] == expected["calls"]
    if name == "openrouter":
        assert message["reasoning_details"] == [{"type": "reasoning.text", "text": "Thinking hard.", "format": "anthropic-claude-v1",
                                                 "signature": SIGNATURE, "index": 0}]  # fmt: skip
    assert result.names.index("message") < result.names.index("usage") < result.names.index("done")
    if expected["reasoning_tokens"]:
        assert json.loads(result.of("usage")[0])["reasoning_tokens"] == expected["reasoning_tokens"]
    # the reasoning never leaks into the text, and comes before it
    if expected["reasoning"] and expected["content"]:
        assert result.names.index("reasoning") < result.names.index("token")


@pytest.mark.parametrize("name", list(TRANSCRIPTS))
def test_v1_gives_the_sdk_tool_calls_reasoning_content_and_reasoning_tokens(rig: Rig, name: str) -> None:
    expected = EXPECTED[name]
    rig.reset(TRANSCRIPTS[name])
    with sdk_at(rig.gw.url) as sdk, sdk.chat.completions.stream(model="openai/deepseek-reasoner", messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
                                                                stream_options={"include_usage": True}) as s:  # fmt: skip
        final = s.get_final_completion()
    message = final.choices[0].message
    assert calls_of(message) == expected["calls"]
    assert (message.content or "") == expected["content"] and final.choices[0].finish_reason == expected["finish"]
    assert (message.model_extra or {}).get("reasoning_content", "") == expected["reasoning"]
    assert final.usage is not None
    details = final.usage.completion_tokens_details
    assert (details.reasoning_tokens if details else None) == expected["reasoning_tokens"]
    if name == "openrouter":
        (detail,) = (message.model_extra or {})["reasoning_details"]
        assert (detail["text"], detail["signature"], detail["format"]) == ("Thinking hard.", SIGNATURE, "anthropic-claude-v1")


# --- the DeepSeek round trip: a server that refuses a tool-call turn without its reasoning ---


def deepseek(seen: Seen) -> Reply:
    """As DeepSeek's thinking mode: a continued tool-call turn must carry its reasoning_content back."""
    for i, m in enumerate(seen.json["messages"]):
        if m["role"] == "assistant" and m.get("tool_calls") and not m.get("reasoning_content"):
            error = {"message": f"Missing `reasoning_content` field in the assistant message at message index {i}. For more "
                                "information, please refer to https://api-docs.deepseek.com/guides/thinking_mode#tool-calls",
                     "type": "invalid_request_error", "param": None, "code": "invalid_request_error"}  # fmt: skip
            return Reply(400, "application/json", [json.dumps({"error": error}).encode()])
    if seen.json["messages"][-1]["role"] == "tool":
        return reply(chunk({"role": "assistant", "content": "", "reasoning_content": "Got it."}),
                     chunk({"content": "Sunny in Paris."}), chunk({"content": ""}, "stop"), chunk(None, usage=usage(40, 9, 3)))  # fmt: skip
    return DEEPSEEK


def test_a_two_turn_tool_loop_with_the_openai_sdk_continues_on_a_deepseek_style_server(rig: Rig) -> None:
    rig.reset()
    rig.respond = deepseek  # type: ignore[method-assign]
    try:
        sdk = gateway_sdk(rig)
        with sdk.chat.completions.stream(model="openai/deepseek-reasoner", messages=ASK, tools=TOOLS) as s:  # type: ignore[arg-type]
            first = s.get_final_completion().choices[0].message
        (call,) = first.tool_calls or []
        history = [*ASK, first.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
        with sdk.chat.completions.stream(model="openai/deepseek-reasoner", messages=history, tools=TOOLS) as s:  # type: ignore[arg-type]
            second = s.get_final_completion().choices[0].message
        assert second.content == "Sunny in Paris." and (second.model_extra or {}).get("reasoning_content") == "Got it."
        sent = rig.seen[-1].json["messages"][1]
        assert sent["reasoning_content"] == "The user wants the weather."
        function = {"name": "get_weather", "arguments": DEEPSEEK_ARGS}
        assert sent["tool_calls"] == [{"id": "call_00_Qx7", "type": "function", "function": function}]
        # the fake does refuse a history without it, as DeepSeek does
        bare = [*ASK, {k: v for k, v in first.model_dump().items() if k != "reasoning_content"}, history[-1]]
        with pytest.raises(openai.BadRequestError, match="Missing `reasoning_content`"):
            sdk.chat.completions.create(model="openai/deepseek-reasoner", messages=bare, tools=TOOLS)  # type: ignore[arg-type]
    finally:
        del rig.respond


def test_the_request_goes_upstream_in_the_chat_shape_as_is(rig: Rig) -> None:
    rig.reset(PARALLEL)
    history = [{"role": "user", "content": [{"type": "text", "text": "Look"},
                                            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]  # fmt: skip
    sdk = gateway_sdk(rig)
    sdk.chat.completions.create(model="openai/m", messages=history, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                                parallel_tool_calls=True, reasoning_effort="high", response_format={"type": "json_object"})  # fmt: skip
    body = rig.seen[-1].json
    assert body["messages"] == history and body["tools"] == TOOLS
    assert (body["tool_choice"], body["parallel_tool_calls"], body["reasoning_effort"]) == ("required", True, "high")
    assert body["response_format"] == {"type": "json_object"}
    sdk.chat.completions.create(model="openai/m", messages=ASK)  # type: ignore[arg-type]
    assert not {"tools", "tool_choice", "parallel_tool_calls", "reasoning_effort", "response_format"} & set(rig.seen[-1].json)


def test_round_trip_fields_go_where_a_server_knows_them() -> None:
    turn = {"role": "assistant", "content": None, "reasoning_content": "r",
            "reasoning_details": [{"type": "reasoning.text", "text": "r", "signature": "s", "index": 0},
                                  {"type": "thinking", "thinking": "x"}],
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"},
                            "extra_content": {"google": {"thought_signature": "sig"}}}]}  # fmt: skip
    request = ChatRequest([*ASK, turn, {"role": "tool", "tool_call_id": "c", "content": "ok"}], "openai", "m", 100)
    _, body, _ = build_request(Upstream("https://openrouter.ai/api/v1"), request)
    sent = body["messages"][1]
    assert sent["reasoning_content"] == "r" and sent["tool_calls"] == turn["tool_calls"]
    assert sent["reasoning_details"] == [turn["reasoning_details"][0]]  # OpenRouter's own shape only
    _, body, _ = build_request(Upstream("https://api.openai.com/v1"), request)
    sent = body["messages"][1]
    assert sent == {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                                          "function": {"name": "f", "arguments": "{}"}}]}  # fmt: skip
    assert request.messages[1] is turn and "reasoning_content" in turn  # the request itself untouched


def test_a_gemini_signature_on_a_call_comes_back_as_its_extra_content(rig: Rig) -> None:
    extra = {"google": {"thought_signature": "CvcBAb4+9vv=="}}
    call = {"index": 0, "id": "function-call-1", "type": "function", "extra_content": extra,
            "function": {"name": "get_time", "arguments": "{}"}}
    rig.reset(reply(chunk({"role": "assistant", "tool_calls": [call]}),
                    chunk({}, "tool_calls")))  # fmt: skip
    result = rig.chat("openai", ASK, tools=TOOLS)  # type: ignore[arg-type]
    (message,) = [json.loads(d) for d in result.of("message")]
    assert message["tool_calls"][0]["extra_content"] == extra and result.of("done") == ["tool_calls"]


# --- any split of the arguments joins back to them, on both routes ---------------------


def split_reply(arguments: str, cuts: list[int]) -> Reply:
    edges = [0, *sorted({c for c in cuts if 0 < c < len(arguments)}), len(arguments)]
    fragments = [arguments[a:b] for a, b in itertools.pairwise(edges)]
    return reply(chunk({"role": "assistant", "content": None, "tool_calls": [
                     {"index": 0, "id": "call_H", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
                 *[chunk({"tool_calls": [{"index": 0, "function": {"arguments": f}}]}) for f in fragments],
                 chunk({}, "tool_calls"))  # fmt: skip


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=12), st.integers(), st.booleans(), st.none()), max_size=4),
       cuts=st.lists(st.integers(min_value=1, max_value=200), max_size=12), ensure_ascii=st.booleans())  # fmt: skip
def test_any_split_of_the_arguments_joins_to_them_on_both_routes(rig: Rig, value: dict[str, Any], cuts: list[int],
                                                                 ensure_ascii: bool) -> None:
    arguments = json.dumps(value, ensure_ascii=ensure_ascii)
    rig.reset(split_reply(arguments, cuts))
    result = rig.chat("openai", ASK, tools=TOOLS)  # type: ignore[arg-type]
    assert "".join(json.loads(d)["arguments"] for d in result.of("tool_call")) == arguments
    sdk = gateway_sdk(rig)
    chunks = sdk.chat.completions.create(model="openai/m", messages=ASK, tools=TOOLS, stream=True)  # type: ignore[arg-type]
    joined = "".join(c.choices[0].delta.tool_calls[0].function.arguments or "" for c in chunks  # type: ignore[index, union-attr]
                     if c.choices and c.choices[0].delta.tool_calls)  # fmt: skip
    assert joined == arguments


# --- and the same loop against echo, no upstream at all --------------------------------


def test_a_two_turn_tool_loop_against_echo_with_the_openai_sdk(rig: Rig) -> None:
    sdk = gateway_sdk(rig)
    ask = [{"role": "user", "content": "Paris please"}]
    with sdk.chat.completions.stream(model="echo/echo", messages=ask, tools=TOOLS) as s:  # type: ignore[arg-type]
        first = s.get_final_completion().choices[0]
    assert first.finish_reason == "tool_calls"
    (call,) = first.message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"text": "Paris please"})
    history = [*ask, first.message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}]
    second = sdk.chat.completions.create(model="echo/echo", messages=history, tools=TOOLS)  # type: ignore[arg-type]
    assert (second.choices[0].message.content, second.choices[0].finish_reason) == ("Sunny", "stop")
