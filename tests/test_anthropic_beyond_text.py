"""The anthropic backend beyond text (DESIGN.md "Beyond text"): a thinking +
tool_use turn, from a transcript in Anthropic's documented stream format,
checked first against the `anthropic` SDK's MessageStream (the oracle), then
through the gateway on /chat/stream and on /v1 (the `openai` SDK); a fake
Anthropic that, as the real API does, refuses a continued tool turn whose
signed thinking is missing or changed, and an agent loop of two turns that it
accepts; the request's translation; what is refused (400, naming the field,
no upstream request). Over real sockets (uvicorn) and in-process on asyncio
and trio."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asgi_stream import Gateway
from providers import ChatRequest, Unsupported, Upstream
from providers import anthropic as provider
from tests.conftest import Result, closed_after_test
from tests.rig import Rig, rig_fixture  # noqa: F401
from tests.test_inprocess import ENV, post_json, request, sse_events
from tests.upstream import FakeUpstream, Reply, Seen

GATEWAY_ENV = {"MAX_TOKENS_LIMIT": "8192"}
MODEL = "claude-sonnet-4-20250514"
THOUGHTS = ["The user wants the weather", " in Paris and Lyon; I call the tool twice."]
SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds1ZSl2MZQFj4Jq1hXAL2ixKFi="
REDACTED = "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpPkNRj2YfWXGmKDxH4mPnZ5sQ7vB5URj/ZwY6XU9Gq"
ARGUMENTS = ['{"city": "Paris", "unit": "celsius"}', '{"city": "Lyon"}']
CALL_IDS = ["toolu_01A09q90qw90lq917835lq9", "toolu_01B7fzaGkZzPqgQp2xyZDp3E"]
TEXT = "Let me check both cities."
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]  # fmt: skip
QUESTION = [{"role": "user", "content": "What is the weather in Paris and Lyon?"}]
THINKING = {"reasoning_effort": "medium", "max_tokens": 4096}
ANSWER = "Sunny in both."


# --- transcripts, in Anthropic's documented stream format ---------------------------------


def sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()


def fragments_of(text: str, cuts: list[int]) -> list[str]:
    edges = [0, *sorted({c for c in cuts if 0 < c < len(text)}), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(edges)]


def tool_turn(fragments: list[list[str]] | None = None) -> bytes:
    """A turn that thinks (one signed block, one redacted), says a line, then calls
    get_weather twice in parallel, its input streamed in `fragments` per call."""
    fragments = fragments or [[a[:9], a[9:20], a[20:]] for a in ARGUMENTS]
    start = {"message": {"id": "msg_01", "type": "message", "role": "assistant", "model": MODEL, "content": [],
                         "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 472, "output_tokens": 2}}}  # fmt: skip
    body = [sse("message_start", start),
            sse("content_block_start", {"index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}})]  # fmt: skip
    body += [sse("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": t}}) for t in THOUGHTS]
    body += [sse("content_block_delta", {"index": 0, "delta": {"type": "signature_delta", "signature": SIGNATURE}}),
             sse("content_block_stop", {"index": 0}),
             sse("content_block_start", {"index": 1, "content_block": {"type": "redacted_thinking", "data": REDACTED}}),
             sse("content_block_stop", {"index": 1}),
             sse("content_block_start", {"index": 2, "content_block": {"type": "text", "text": ""}}),
             sse("content_block_delta", {"index": 2, "delta": {"type": "text_delta", "text": TEXT}}),
             sse("content_block_stop", {"index": 2}),
             sse("ping", {})]  # fmt: skip
    for call, (call_id, pieces) in enumerate(zip(CALL_IDS, fragments, strict=True)):
        block = 3 + call
        body.append(sse("content_block_start", {"index": block, "content_block": {"type": "tool_use", "id": call_id,
                                                                                   "name": "get_weather", "input": {}}}))  # fmt: skip
        body += [sse("content_block_delta", {"index": block, "delta": {"type": "input_json_delta", "partial_json": p}}) for p in pieces]
        body.append(sse("content_block_stop", {"index": block}))
    usage = {"output_tokens": 189, "output_tokens_details": {"thinking_tokens": 120}}
    body += [sse("message_delta", {"delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": usage}),
             sse("message_stop", {})]  # fmt: skip
    return b"".join(body)


def answer_turn() -> bytes:
    start = {"message": {"id": "msg_02", "type": "message", "role": "assistant", "model": MODEL, "content": [],
                         "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 620, "output_tokens": 1}}}  # fmt: skip
    return b"".join([
        sse("message_start", start),
        sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": ANSWER}}),
        sse("content_block_stop", {"index": 0}),
        sse("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 6}}),
        sse("message_stop", {}),
    ])  # fmt: skip


def refusal(message: str) -> Reply:
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return Reply(400, "application/json", [json.dumps(body).encode()])


def strict_anthropic(seen: Seen) -> Reply:
    """As the real API: a request with thinking that continues a tool loop (tool_result
    last) must give back the turn's signed thinking first and unchanged, before its
    tool_use blocks, and every tool_result must answer a tool_use of that turn."""
    body = seen.json
    messages = body["messages"]
    last = messages[-1]["content"]
    if isinstance(last, list) and any(b["type"] == "tool_result" for b in last):
        assistant = messages[-2]
        content = assistant["content"] if isinstance(assistant["content"], list) else []
        uses = {b["id"] for b in content if b["type"] == "tool_use"}
        if {b["tool_use_id"] for b in last if b["type"] == "tool_result"} - uses:
            return refusal("messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks")
        if "thinking" in body:
            first = content[0] if content else {}
            if first.get("type") not in ("thinking", "redacted_thinking"):
                return refusal(f"messages.{len(messages) - 2}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                               f"`{first.get('type')}`. When `thinking` is enabled, a final `assistant` message must start with a "
                               "thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks).")  # fmt: skip
            expected = [{"type": "thinking", "thinking": "".join(THOUGHTS), "signature": SIGNATURE},
                        {"type": "redacted_thinking", "data": REDACTED}]  # fmt: skip
            if content[:2] != expected:
                return refusal(f"messages.{len(messages) - 2}.content.0: Invalid `signature` in `thinking` block")
        return Reply(pieces=[answer_turn()])
    return Reply(pieces=[tool_turn()])


# --- the oracle: the anthropic SDK reads the transcript as we mean it ---------------------


def test_the_sdk_accumulates_the_transcript_into_thinking_redacted_text_and_two_tool_uses() -> None:
    with FakeUpstream(lambda seen: Reply(pieces=[tool_turn()])) as upstream, \
            anthropic.Anthropic(base_url=upstream.url, api_key="x", max_retries=0) as client:  # fmt: skip
        with client.messages.stream(model=MODEL, max_tokens=4096, messages=QUESTION,  # type: ignore[arg-type]
                                    thinking={"type": "enabled", "budget_tokens": 2048}) as stream:  # fmt: skip
            thinking = [e.thinking for e in stream if e.type == "thinking"]
            message = stream.get_final_message()
    assert thinking == THOUGHTS
    assert [b.model_dump(exclude_none=True) for b in message.content] == [
        {"type": "thinking", "thinking": "".join(THOUGHTS), "signature": SIGNATURE},
        {"type": "redacted_thinking", "data": REDACTED},
        {"type": "text", "text": TEXT},
        {"type": "tool_use", "id": CALL_IDS[0], "name": "get_weather", "input": json.loads(ARGUMENTS[0])},
        {"type": "tool_use", "id": CALL_IDS[1], "name": "get_weather", "input": json.loads(ARGUMENTS[1])},
    ]
    assert message.stop_reason == "tool_use" and message.usage.output_tokens == 189
    assert message.usage.output_tokens_details is not None and message.usage.output_tokens_details.thinking_tokens == 120


def test_the_sdk_continues_the_loop_with_the_strict_fake_and_is_refused_without_the_signature() -> None:
    """The strict fake behaves as the API: the SDK's own message, appended, is accepted;
    without its thinking, or with a changed signature, it is a 400."""
    with FakeUpstream(strict_anthropic) as upstream, anthropic.Anthropic(base_url=upstream.url, api_key="x", max_retries=0) as client:
        thinking: Any = {"type": "enabled", "budget_tokens": 2048}

        def turn(messages: list[Any]) -> list[dict[str, Any]]:
            with client.messages.stream(model=MODEL, max_tokens=4096, messages=messages, thinking=thinking) as stream:
                return [b.model_dump(exclude_none=True) for b in stream.get_final_message().content]

        blocks = turn(QUESTION)
        results = [{"type": "tool_result", "tool_use_id": i, "content": "sunny"} for i in CALL_IDS]

        def continued(content: list[Any]) -> list[dict[str, Any]]:
            return turn([*QUESTION, {"role": "assistant", "content": content}, {"role": "user", "content": results}])

        assert continued(blocks) == [{"type": "text", "text": ANSWER}]
        for changed, what in ((blocks[2:], "Expected `thinking`"), ([{**blocks[0], "signature": "forged"}, *blocks[1:]], "signature")):
            with pytest.raises(anthropic.BadRequestError) as caught:
                continued(changed)
            assert what in str(caught.value)


# --- through the gateway: /chat/stream ---------------------------------------------------


def expected_message() -> dict[str, Any]:
    return {
        "role": "assistant", "content": TEXT,
        "tool_calls": [{"id": i, "type": "function", "function": {"name": "get_weather", "arguments": a}}
                       for i, a in zip(CALL_IDS, ARGUMENTS, strict=True)],
        "reasoning_content": "".join(THOUGHTS),
        "reasoning_details": [
            {"type": "reasoning.text", "text": "".join(THOUGHTS), "signature": SIGNATURE, "format": "anthropic-claude-v1", "index": 0},
            {"type": "reasoning.encrypted", "data": REDACTED, "format": "anthropic-claude-v1", "index": 1},
        ],
    }  # fmt: skip


def calls_of(result: Result) -> dict[int, dict[str, str]]:
    """The tool_call events joined by index, as a client joins them."""
    calls: dict[int, dict[str, str]] = {}
    for data in result.of("tool_call"):
        piece = json.loads(data)
        call = calls.setdefault(piece["index"], {"id": piece.get("id", ""), "name": piece.get("name", ""), "arguments": ""})
        call["arguments"] += piece["arguments"]
    return calls


def test_chat_stream_streams_reasoning_text_and_calls_then_the_message_to_continue(rig: Rig) -> None:
    rig.reset(Reply(pieces=[tool_turn()]))
    result = rig.chat("anthropic", QUESTION, tools=TOOLS, **THINKING)
    assert result.status == 200
    names = result.names
    assert names[:3] == ["reasoning", "reasoning", "token"] and names[-3:] == ["message", "usage", "done"]
    assert result.of("reasoning") == THOUGHTS and result.text == TEXT and result.of("done") == ["tool_calls"]
    first = [json.loads(d) for d in result.of("tool_call") if "id" in json.loads(d)]
    assert [(f["index"], f["id"], f["name"]) for f in first] == [(0, CALL_IDS[0], "get_weather"), (1, CALL_IDS[1], "get_weather")]
    assert calls_of(result) == {k: {"id": CALL_IDS[k], "name": "get_weather", "arguments": ARGUMENTS[k]} for k in (0, 1)}
    assert json.loads(result.of("message")[0]) == expected_message()
    usage = json.loads(result.of("usage")[0])
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["reasoning_tokens"]) == (472, 189, 120)


def test_chat_stream_agent_loop_of_two_turns_is_accepted_by_the_strict_upstream(rig: Rig) -> None:
    rig.reset()
    rig.respond = strict_anthropic  # type: ignore[method-assign]
    try:
        first = rig.chat("anthropic", QUESTION, tools=TOOLS, **THINKING)
        message = json.loads(first.of("message")[0])
        results = [{"role": "tool", "tool_call_id": c["id"], "content": "sunny"} for c in message["tool_calls"]]
        second = rig.chat("anthropic", [*QUESTION, message, *results], tools=TOOLS, **THINKING)
        assert second.names == ["token", "usage", "done"] and second.text == ANSWER and second.of("done") == ["stop"]
        sent = rig.seen[-1].json
        assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048}
        assert sent["messages"][1]["content"][:2] == [
            {"type": "thinking", "thinking": "".join(THOUGHTS), "signature": SIGNATURE}, {"type": "redacted_thinking", "data": REDACTED}]
        assert sent["messages"][2] == {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": i, "content": "sunny"} for i in CALL_IDS]}  # fmt: skip
        # the same history with its signature changed is refused upstream, and the client is told
        changed = {**message, "reasoning_details": [{**message["reasoning_details"][0], "signature": "forged"},
                                                    message["reasoning_details"][1]]}  # fmt: skip
        refused = rig.chat("anthropic", [*QUESTION, changed, *results], tools=TOOLS, **THINKING)
        error = json.loads(refused.of("error")[0])
        assert error["status"] == 400 and "signature" in error["message"] and refused.of("done") == ["error"]
    finally:
        del rig.respond


def test_a_tool_turn_without_anthropics_signed_thinking_continues_without_thinking(rig: Rig) -> None:
    """A tool loop begun elsewhere (no signature, or another provider's reasoning)
    runs without thinking, which the API accepts, instead of a 400."""
    rig.reset()
    rig.respond = strict_anthropic  # type: ignore[method-assign]
    try:
        message = {**expected_message(), "reasoning_details": [{"type": "reasoning.encrypted", "data": "x", "format": "openai-v1"}]}
        results = [{"role": "tool", "tool_call_id": i, "content": "sunny"} for i in CALL_IDS]
        for history in ([*QUESTION, {k: v for k, v in message.items() if k != "reasoning_details"}, *results],
                        [*QUESTION, message, *results]):  # fmt: skip
            result = rig.chat("anthropic", history, tools=TOOLS, **THINKING)
            assert result.text == ANSWER and result.of("done") == ["stop"]
            sent = rig.seen[-1].json
            assert "thinking" not in sent and sent["messages"][1]["content"][0] == {"type": "text", "text": TEXT}
    finally:
        del rig.respond


# --- through the gateway: /v1 with the openai SDK ---------------------------------------


def sdk(rig: Rig) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=rig.gw.url + "/v1", api_key="x", max_retries=0, timeout=30))


def completion_of(rig: Rig, messages: list[Any], **fields: Any) -> dict[str, Any]:
    """The assistant message as a client accumulates it from the streamed chunks."""
    message: dict[str, Any] = {"role": "assistant", "content": "", "reasoning_content": "", "reasoning_details": []}
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in sdk(rig).chat.completions.create(model=f"anthropic/{MODEL}", messages=messages, stream=True, **fields):
        if not chunk.choices:
            continue
        delta, finish = chunk.choices[0].delta, chunk.choices[0].finish_reason or finish
        message["content"] += delta.content or ""
        extra = delta.model_extra or {}
        message["reasoning_content"] += extra.get("reasoning_content") or ""
        message["reasoning_details"] += extra.get("reasoning_details") or []
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            call["id"] += piece.id or ""
            call["function"]["name"] += piece.function.name or "" if piece.function else ""
            call["function"]["arguments"] += piece.function.arguments or "" if piece.function else ""
    if calls:
        message["tool_calls"] = [calls[k] for k in sorted(calls)]
    return {"message": message, "finish": finish}


def test_v1_streams_reasoning_content_tool_calls_and_reasoning_details(rig: Rig) -> None:
    rig.reset(Reply(pieces=[tool_turn()]))
    got = completion_of(rig, QUESTION, tools=TOOLS, **THINKING)
    expected = expected_message()
    assert got["finish"] == "tool_calls"
    assert got["message"] == {**expected, "content": TEXT}


def test_v1_agent_loop_with_the_sdks_stream_helper_is_accepted_by_the_strict_upstream(rig: Rig) -> None:
    rig.reset()
    rig.respond = strict_anthropic  # type: ignore[method-assign]
    try:
        with sdk(rig).chat.completions.stream(model=f"anthropic/{MODEL}", messages=QUESTION, tools=TOOLS,  # type: ignore[arg-type]
                                              **THINKING) as stream:  # fmt: skip
            final = stream.get_final_completion()
        choice = final.choices[0]
        assert choice.finish_reason == "tool_calls"
        message = choice.message.model_dump(exclude_none=True)
        assert [c["function"]["arguments"] for c in message["tool_calls"]] == ARGUMENTS
        assert message["reasoning_details"] == expected_message()["reasoning_details"]
        results = [{"role": "tool", "tool_call_id": c["id"], "content": "sunny"} for c in message["tool_calls"]]
        answer = sdk(rig).chat.completions.create(model=f"anthropic/{MODEL}", messages=[*QUESTION, message, *results],
                                                  tools=TOOLS, **THINKING)  # type: ignore[arg-type]  # fmt: skip
        assert answer.choices[0].message.content == ANSWER and answer.choices[0].finish_reason == "stop"
    finally:
        del rig.respond


# --- any split of the arguments joins back exactly, on both routes ------------------------

cuts = st.lists(st.integers(1, 60), max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=cuts, second=cuts)
@example(first=[], second=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
def test_any_split_of_the_input_json_joins_to_the_arguments_on_both_routes(rig: Rig, first: list[int], second: list[int]) -> None:
    fragments = [fragments_of(ARGUMENTS[0], first), fragments_of(ARGUMENTS[1], second)]
    rig.reset(Reply(pieces=[tool_turn(fragments)]))
    result = rig.chat("anthropic", QUESTION, tools=TOOLS, **THINKING)
    assert [c["arguments"] for _, c in sorted(calls_of(result).items())] == ARGUMENTS
    assert [c["function"]["arguments"] for c in json.loads(result.of("message")[0])["tool_calls"]] == ARGUMENTS
    got = completion_of(rig, QUESTION, tools=TOOLS, **THINKING)
    assert [c["function"]["arguments"] for c in got["message"]["tool_calls"]] == ARGUMENTS


# --- refusals: 400 naming the field, before any upstream request --------------------------

REFUSED = [
    ({**THINKING, "tool_choice": "required"}, "tool_choice"),
    ({**THINKING, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({**THINKING, "temperature": 0.5}, "temperature"),
    ({"reasoning_effort": "high", "max_tokens": 1024}, "max_tokens"),
    ({"reasoning_effort": "low"}, "max_tokens"),  # the default MAX_TOKENS, 1024, leaves no budget
    ({"response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize(("fields", "param"), REFUSED, ids=[f"{p}-{i}" for i, (_, p) in enumerate(REFUSED)])
def test_what_anthropic_refuses_is_a_400_naming_the_field_on_both_routes(rig: Rig, fields: dict[str, Any], param: str) -> None:
    rig.reset()
    result = rig.chat("anthropic", QUESTION, tools=TOOLS, **fields)
    error = json.loads(result.body)["error"]
    assert result.status == 400 and param in error["message"] and "anthropic" in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(rig).chat.completions.create(model=f"anthropic/{MODEL}", messages=QUESTION, tools=TOOLS, **fields)  # type: ignore[arg-type]
    assert caught.value.param == param and "anthropic" in caught.value.message
    assert rig.seen == []


def test_temperature_one_and_tool_choice_auto_or_none_go_with_thinking(rig: Rig) -> None:
    for choice in ("auto", "none"):
        rig.reset(Reply(pieces=[answer_turn()]))
        assert rig.chat("anthropic", QUESTION, tools=TOOLS, tool_choice=choice, temperature=1, **THINKING).text == ANSWER
        sent = rig.seen[0].json
        assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048} and sent["tool_choice"] == {"type": choice}


# --- the request's translation -------------------------------------------------------------

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def body_for(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    request = ChatRequest(messages=messages, backend="anthropic", model=MODEL, **{"max_tokens": 4096, **fields})
    url, body, headers = provider.build_request(Upstream("https://api.anthropic.com", "k"), request)
    assert url == "https://api.anthropic.com/v1/messages" and headers["x-api-key"] == "k"
    return body


def test_a_whole_conversation_becomes_anthropic_blocks() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this and the weather?"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]},
        {k: v for k, v in expected_message().items() if k != "reasoning_content"},
        {"role": "tool", "tool_call_id": CALL_IDS[0], "content": "sunny"},
        {"role": "tool", "tool_call_id": CALL_IDS[1], "content": [{"type": "text", "text": "rainy"}]},
    ]  # fmt: skip
    body = body_for(messages, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False, reasoning_effort="high",
                    response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}})  # fmt: skip
    assert body == {
        "model": MODEL, "max_tokens": 4096, "stream": True, "system": "Be brief.",
        "thinking": {"type": "enabled", "budget_tokens": 3072},
        "tools": [{"name": "get_weather", "description": "The weather in a city", "input_schema": TOOLS[0]["function"]["parameters"]}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is this and the weather?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "".join(THOUGHTS), "signature": SIGNATURE},
                {"type": "redacted_thinking", "data": REDACTED},
                {"type": "text", "text": TEXT},
                {"type": "tool_use", "id": CALL_IDS[0], "name": "get_weather", "input": {"city": "Paris", "unit": "celsius"}},
                {"type": "tool_use", "id": CALL_IDS[1], "name": "get_weather", "input": {"city": "Lyon"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": CALL_IDS[0], "content": "sunny"},
                {"type": "tool_result", "tool_use_id": CALL_IDS[1], "content": [{"type": "text", "text": "rainy"}]}]},
        ],
    }  # fmt: skip


@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    (None, None, None),
    ("auto", None, {"type": "auto"}),
    ("none", False, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
])  # fmt: skip
def test_tool_choice_and_parallel_tool_calls_map_to_anthropics(choice: Any, parallel: bool | None, expected: Any) -> None:
    body = body_for(QUESTION, tools=[{"type": "function", "function": {"name": "get_weather"}}], tool_choice=choice,
                    parallel_tool_calls=parallel)  # fmt: skip
    assert body["tools"] == [{"name": "get_weather", "input_schema": {"type": "object"}}]
    assert body.get("tool_choice") == expected


@pytest.mark.parametrize(("effort", "max_tokens", "budget"), [
    ("minimal", 2048, 1024), ("low", 2048, 1024), ("low", 8192, 2048), ("medium", 8192, 4096), ("high", 8192, 6144),
    ("high", 1025, 1024), ("none", 100, None), (None, 100, None),
])  # fmt: skip
def test_reasoning_effort_is_a_budget_out_of_max_tokens(effort: str | None, max_tokens: int, budget: int | None) -> None:
    body = body_for(QUESTION, reasoning_effort=effort, max_tokens=max_tokens)
    assert body["max_tokens"] == max_tokens  # never raised
    assert body.get("thinking") == (None if budget is None else {"type": "enabled", "budget_tokens": budget})


@pytest.mark.parametrize(("messages", "fields", "param"), [
    (QUESTION, {"reasoning_effort": "low", "max_tokens": 1024}, "max_tokens"),
    (QUESTION, {"reasoning_effort": "low", "top_p": 0.5}, "top_p"),
    (QUESTION, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,PHN2Zz4="}}]}], {},
     "messages[0].content[0]"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}, *QUESTION], {},
     "messages[0]"),
    ([*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "t", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}], {},
     "messages[1].tool_calls[0].function.arguments"),
])  # fmt: skip
def test_check_refuses_what_cannot_be_sent_naming_the_field(messages: list[Any], fields: dict[str, Any], param: str) -> None:
    request = ChatRequest(messages=messages, backend="anthropic", model=MODEL, **{"max_tokens": 4096, **fields})
    with pytest.raises(Unsupported) as caught:
        provider.check(request)
    assert caught.value.field == param and "anthropic" in caught.value.message


def test_a_plain_text_conversation_is_sent_exactly_as_before() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    assert body_for(messages) == {"model": MODEL, "max_tokens": 4096, "stream": True, "messages": [
        {"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]}  # fmt: skip


# --- in-process, on asyncio and trio ------------------------------------------------------


async def served(respond: Callable[[Seen], Reply], path: str, body: dict[str, Any]) -> tuple[Any, list[Seen]]:
    with FakeUpstream(respond) as upstream:
        app = Gateway({**ENV, "ANTHROPIC_API_KEY": "sk-ant-x", "ANTHROPIC_BASE_URL": upstream.url})
        try:
            ex = await request(app, "POST", path, **post_json(body))
        finally:
            await app.aclose()
        return ex, upstream.seen


@pytest.mark.anyio
async def test_in_process_a_thinking_tool_turn_and_its_continuation_on_both_routes(anyio_backend: str) -> None:
    ex, _ = await served(strict_anthropic, "/chat/stream", {"backend": "anthropic", "messages": QUESTION, "tools": TOOLS, **THINKING})
    events = sse_events(ex.body)[1:]
    assert [n for n, _, _ in events][-3:] == ["message", "usage", "done"] and events[-1][1] == "tool_calls"
    message = orjson.loads(next(d for n, d, _ in events if n == "message"))
    assert message == expected_message()
    results = [{"role": "tool", "tool_call_id": i, "content": "sunny"} for i in CALL_IDS]
    history = [*QUESTION, message, *results]
    ex, seen = await served(strict_anthropic, "/chat/stream", {"backend": "anthropic", "messages": history, "tools": TOOLS, **THINKING})
    assert [(n, d) for n, d, _ in sse_events(ex.body)[1:] if n in ("token", "done")] == [("token", ANSWER), ("done", "stop")]
    assert seen[0].json["messages"][1]["content"][0]["signature"] == SIGNATURE
    body = {"model": f"anthropic/{MODEL}", "messages": QUESTION, "tools": TOOLS, "stream": True, **THINKING}
    ex, _ = await served(strict_anthropic, "/v1/chat/completions", body)
    chunks = [orjson.loads(f[6:]) for f in ex.body.strip().split(b"\n\n") if f != b"data: [DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "".join(THOUGHTS)
    arguments = {0: "", 1: ""}
    for d in deltas:
        for call in d.get("tool_calls", []):
            arguments[call["index"]] += call.get("function", {}).get("arguments", "")
    assert list(arguments.values()) == ARGUMENTS
    assert [r for d in deltas for r in d.get("reasoning_details", [])] == expected_message()["reasoning_details"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_tool_loop_is_one_turn_whose_first_assistant_message_carries_the_thinking() -> None:
    signed = {k: v for k, v in expected_message().items() if k != "reasoning_content"}
    unsigned = {k: v for k, v in signed.items() if k != "reasoning_details"}
    result = [{"role": "tool", "tool_call_id": i, "content": "sunny"} for i in CALL_IDS]
    loop = [*QUESTION, signed, *result, unsigned, *result]  # a second round: Anthropic thinks once per turn
    assert "thinking" in body_for(loop, reasoning_effort="low")
    assert "thinking" not in body_for([*QUESTION, unsigned, *result, signed, *result], reasoning_effort="low")
    # a new user question after an unsigned tool loop is a new turn: it may think
    assert "thinking" in body_for([*QUESTION, unsigned, *result, {"role": "assistant", "content": "ok"}, *QUESTION],
                                  reasoning_effort="low")  # fmt: skip
