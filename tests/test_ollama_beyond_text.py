"""Ollama beyond text (DESIGN.md "Beyond text", issue 20): `message.thinking`
as reasoning, whole tool calls as tool_call events (ids made by the gateway
where Ollama gives none), `done_reason: stop` on a tool turn as `tool_calls`,
and the request mapped to `/api/chat` (images, tool calls and results,
`think`, `format`). Transcripts in tests/fixtures/ollama/ (thinking.ndjson,
tool_call.ndjson, tool_answer.ndjson) are served over a real socket and read
by the `ollama` SDK first, as the oracle; then through the gateway on
`/chat/stream` and on `/v1` with the `openai` SDK. Refusals are 400s naming
the field, with no upstream request."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import ollama
import openai
import pytest
from ollama._types import ChatRequest

from tests.conftest import Result, stream
from tests.rig import Rig, cut, natural_pieces, rig_fixture  # noqa: F401
from tests.upstream import FIXTURES, Reply

NDJSON = "application/x-ndjson"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
ASK = [{"role": "user", "content": "Weather in Paris and Lyon?"}]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def transcript(name: str) -> bytes:
    return (FIXTURES / "ollama" / f"{name}.ndjson").read_bytes()


def reply(name: str, pieces: list[bytes] | None = None) -> Reply:
    body = transcript(name)
    return Reply(200, NDJSON, list(pieces if pieces is not None else natural_pieces(body)))


@dataclass
class Turn:
    """What one streamed turn says, whoever read it."""

    reasoning: str = ""
    text: str = ""
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # name, arguments
    finish: str | None = None
    usage: tuple[int, int] | None = None


def sdk_turn(url: str, **options: Any) -> Turn:
    """The oracle: what ollama-python extracts from the same bytes."""
    out = Turn()
    client = ollama.Client(host=url)
    try:
        for part in client.chat(model="qwen3", messages=ASK, stream=True, **options):
            out.reasoning += part.message.thinking or ""
            out.text += part.message.content or ""
            out.calls += [(c.function.name, dict(c.function.arguments)) for c in part.message.tool_calls or []]
            if part.done:
                # the contract's normalization: a turn that called tools ends tool_calls
                out.finish = "tool_calls" if out.calls and part.done_reason == "stop" else part.done_reason
                out.usage = (part.prompt_eval_count or 0, part.eval_count or 0)
    finally:
        client._client.close()
    return out


def gateway_turn(result: Result) -> Turn:
    assert result.status == 200, result.body
    calls: dict[int, list[Any]] = {}
    for data in result.of("tool_call"):
        event = json.loads(data)
        calls.setdefault(event["index"], [event.get("name"), ""])[1] += event["arguments"]
    (usage,) = [json.loads(u) for u in result.of("usage")]
    (finish,) = result.of("done")
    return Turn("".join(result.of("reasoning")), result.text, [(name, json.loads(args)) for name, args in calls.values()],
                finish, (usage["prompt_tokens"], usage["completion_tokens"]))  # fmt: skip


def sdk_request(sent: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages as ollama-python's own request type reads and writes them back."""
    request = ChatRequest.model_validate({k: v for k, v in sent.items() if k != "options"})
    dumped: list[dict[str, Any]] = request.model_dump(exclude_none=True, mode="json")["messages"]
    return dumped


def message_of(result: Result) -> dict[str, Any]:
    (message,) = [json.loads(m) for m in result.of("message")]
    return message


# --- the transcripts, read by the SDK and by the gateway -----------------------------


@pytest.mark.parametrize("cuts", [None, [1, 50, 51, 200, 333, 600], list(range(3, 2000, 17))])
def test_thinking_then_answer_as_the_sdk_reads_it(rig: Rig, cuts: list[int] | None) -> None:
    body = transcript("thinking")
    rig.reset(reply("thinking", cut(body, cuts) if cuts else None))
    oracle = sdk_turn(rig.upstream.url, think=True)
    assert oracle.reasoning == "The user greets me <in French>; answer in kind, é.\n"
    result = rig.chat("ollama", ASK, reasoning_effort="high")
    assert gateway_turn(result) == oracle
    assert result.names == ["reasoning"] * 3 + ["token"] * 3 + ["message", "usage", "done"]
    assert message_of(result) == {"role": "assistant", "content": "Bonjour à vous\n你好", "reasoning_content": oracle.reasoning}
    assert rig.seen[-1].json["think"] is True


@pytest.mark.parametrize("cuts", [None, [7, 300, 301, 700], list(range(5, 2000, 13))])
def test_tool_calls_as_the_sdk_reads_them(rig: Rig, cuts: list[int] | None) -> None:
    body = transcript("tool_call")
    rig.reset(reply("tool_call", cut(body, cuts) if cuts else None))
    oracle = sdk_turn(rig.upstream.url, tools=TOOLS)
    assert oracle.finish == "tool_calls" and len(oracle.calls) == 2
    result = rig.chat("ollama", ASK, tools=TOOLS)
    assert gateway_turn(result) == oracle
    assert result.names == ["reasoning", "reasoning", "tool_call", "tool_call", "message", "usage", "done"]
    first, second = (json.loads(e) for e in result.of("tool_call"))
    assert first["index"] == 0 and first["id"].startswith("call_") and first["name"] == "get_weather"
    assert second["index"] == 1 and second["id"] == "call_lyon7"  # Ollama's own id, when it sends one
    message = message_of(result)
    assert message["content"] is None and message["reasoning_content"] == "I need the weather for Paris & Lyon."
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        (first["id"], "get_weather", {"city": "Paris", "unit": "celsius"}),
        ("call_lyon7", "get_weather", {"city": "Lyon", "days": [1, 2], "note": "<é>"}),
    ]
    sent = rig.seen[-1].json
    assert sent["tools"] == TOOLS and "think" not in sent


def test_v1_with_the_openai_sdk(rig: Rig) -> None:
    rig.reset(reply("tool_call"))
    reasoning, finish = "", None
    calls: dict[int, dict[str, str]] = {}
    with openai.OpenAI(base_url=rig.gw.url + "/v1", api_key="unused", max_retries=0) as client:
        for chunk in client.chat.completions.create(model="ollama/qwen3", messages=ASK, tools=TOOLS, stream=True):  # type: ignore[arg-type]
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            assert not delta.content
            for call in delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += call.id or ""
                slot["name"] += (call.function.name if call.function else None) or ""
                slot["arguments"] += (call.function.arguments if call.function else None) or ""
            finish = chunk.choices[0].finish_reason or finish
    assert reasoning == "I need the weather for Paris & Lyon."
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_weather", {"city": "Lyon", "days": [1, 2], "note": "<é>"})]
    assert calls[0]["id"].startswith("call_") and calls[1]["id"] == "call_lyon7"


def test_two_turn_tool_loop(rig: Rig) -> None:
    rig.reset(reply("tool_call"), reply("tool_answer"))
    first = rig.chat("ollama", ASK, tools=TOOLS)
    message = message_of(first)
    paris, lyon = (call["id"] for call in message["tool_calls"])
    history = [*ASK, message, {"role": "tool", "tool_call_id": lyon, "content": "19 °C"},
               {"role": "tool", "tool_call_id": paris, "content": [{"type": "text", "text": "21 °C"}]}]  # fmt: skip
    second = rig.chat("ollama", history, tools=TOOLS)
    assert second.status == 200 and second.text == "Paris: 21 °C, Lyon: 19 °C."
    assert second.of("done") == ["stop"] and "message" not in second.names  # a text turn: as before
    sent = rig.seen[-1].json
    assert sent["messages"] == [
        ASK[0],
        {"role": "assistant", "content": "", "thinking": "I need the weather for Paris & Lyon.",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}},
                        {"function": {"name": "get_weather", "arguments": {"city": "Lyon", "days": [1, 2], "note": "<é>"}}}]},
        {"role": "tool", "content": "19 °C", "tool_name": "get_weather"},
        {"role": "tool", "content": "21 °C", "tool_name": "get_weather"},
    ]  # fmt: skip
    assert sent["tools"] == TOOLS
    # the SDK accepts what the gateway sent as its own request shape
    assert sdk_request(sent) == sent["messages"]


def test_two_turn_loop_on_v1_as_the_openai_sdk_accumulates_it(rig: Rig) -> None:
    rig.reset(reply("tool_call"), reply("tool_answer"))
    with openai.OpenAI(base_url=rig.gw.url + "/v1", api_key="unused", max_retries=0) as client:
        done = client.chat.completions.create(model="ollama/qwen3", messages=ASK, tools=TOOLS)  # type: ignore[arg-type]
        message = done.choices[0].message
        assert done.choices[0].finish_reason == "tool_calls" and message.tool_calls
        history: list[Any] = [*ASK, message.model_dump(exclude_none=True)]
        history += [{"role": "tool", "tool_call_id": call.id, "content": "ok"} for call in message.tool_calls]
        answer = client.chat.completions.create(model="ollama/qwen3", messages=history, tools=TOOLS)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "Paris: 21 °C, Lyon: 19 °C."
    sent = rig.seen[-1].json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert sent[1]["tool_calls"][1]["function"]["arguments"] == {"city": "Lyon", "days": [1, 2], "note": "<é>"}
    assert [m.get("tool_name") for m in sent[2:]] == ["get_weather", "get_weather"]


# --- the request's other fields --------------------------------------------------------


@pytest.mark.parametrize(("fields", "expected"), [
    ({"reasoning_effort": "none"}, {"think": False}),
    ({"reasoning_effort": "low"}, {"think": True}),
    ({"reasoning_effort": "minimal"}, {"think": True}),
    ({"reasoning_effort": "medium", "model": "gpt-oss:20b"}, {"think": "medium"}),
    ({"reasoning_effort": "minimal", "model": "gpt-oss:120b-cloud"}, {"think": "low"}),
    ({"reasoning_effort": "high", "model": "hf.co/unsloth/gpt-oss-20b-GGUF"}, {"think": "high"}),
    ({"response_format": {"type": "json_object"}}, {"format": "json"}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object", "required": ["c"]}}}},
     {"format": {"type": "object", "required": ["c"]}}),
    ({"response_format": {"type": "text"}}, {}),
    ({"tools": TOOLS, "tool_choice": "auto"}, {"tools": TOOLS}),
    ({"tools": TOOLS, "tool_choice": "none"}, {}),
])  # fmt: skip
def test_request_fields_become_ollamas(rig: Rig, fields: dict[str, Any], expected: dict[str, Any]) -> None:
    rig.reset(reply("tool_answer"))
    assert rig.chat("ollama", ASK, **fields).status == 200
    sent = rig.seen[-1].json
    extras = {k: sent[k] for k in ("think", "format", "tools") if k in sent}
    assert extras == expected


def test_images_go_inline_and_plain_text_is_unchanged(rig: Rig) -> None:
    rig.reset(reply("tool_answer"))
    svg = "data:image/svg+xml,%3Csvg%2F%3E"  # a data: URL that is not base64
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
             {"type": "text", "text": "And this?"}, {"type": "image_url", "image_url": {"url": svg}}]  # fmt: skip
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
    assert rig.chat("ollama", messages).status == 200
    assert rig.seen[-1].json["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?\nAnd this?", "images": [PNG, "PHN2Zy8+"]},
    ]
    assert sdk_request(rig.seen[-1].json) == rig.seen[-1].json["messages"]  # the SDK's own request shape
    plain = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert rig.chat("ollama", plain).status == 200
    sent = rig.seen[-1].json
    assert sent["messages"] == plain and not {"think", "format", "tools"} & set(sent)


# --- refusals: 400 naming the field, no upstream request -------------------------------


REFUSED = [
    ({"messages": ASK, "tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
    ({"messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "see"},
                                                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "messages[0].content[1].image_url"),
    ({"messages": ASK, "reasoning_effort": "none", "model": "gpt-oss:20b"}, "reasoning_effort"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "[1, 2]"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "x"}]}, "messages[1].tool_calls[0].function.arguments"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), REFUSED)
def test_refusals_on_chat_stream(rig: Rig, body: dict[str, Any], param: str) -> None:
    rig.reset(reply("tool_answer"))
    result = stream("POST", rig.gw.url + "/chat/stream", json={"backend": "ollama", **body})
    assert result.status == 400, result.events
    error = json.loads(result.body)["error"]
    assert error["type"] == "unsupported_parameter" and param in error["message"] and "ollama" in error["message"]
    assert rig.seen == []


@pytest.mark.parametrize(("body", "param"), REFUSED)
def test_refusals_on_v1(rig: Rig, body: dict[str, Any], param: str) -> None:
    rig.reset(reply("tool_answer"))
    body = dict(body)
    model = "ollama/" + body.pop("model", "qwen3")
    with openai.OpenAI(base_url=rig.gw.url + "/v1", api_key="unused", max_retries=0) as client, \
            pytest.raises(openai.BadRequestError) as refused:  # fmt: skip
        client.chat.completions.create(model=model, stream=True, **body)
    assert refused.value.status_code == 400 and refused.value.param == param and refused.value.code == "unsupported_parameter"
    assert rig.seen == []


def test_parallel_tool_calls_false_passes_on_the_first_call_only(rig: Rig) -> None:
    rig.reset(reply("tool_call"))
    result = rig.chat("ollama", ASK, tools=TOOLS, parallel_tool_calls=False)
    assert [json.loads(e)["index"] for e in result.of("tool_call")] == [0]
    assert len(message_of(result)["tool_calls"]) == 1 and result.of("done") == ["tool_calls"]
