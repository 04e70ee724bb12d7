"""Gemini beyond text (DESIGN.md "Beyond text"): thought parts, whole
functionCall parts with their thoughtSignature, thoughtsTokenCount, and the
request side (parts, images, tools, tool_choice, thinkingConfig, JSON output,
functionResponse names from tool_call_id). Transcripts in
`streamGenerateContent?alt=sse` form (CRLF, as Gemini sends) served by a fake
upstream over a real socket; google-genai reads the same bytes as an oracle,
and builds the same request as an oracle of ours; a strict fake Gemini refuses
a continued tool turn whose functionCall part lost its signature or changed
it, as Gemini 3 does ("Corrupted tool call context")."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import openai
import pytest
from google import genai
from google.genai import types as genai_types

from providers import ChatRequest, Unsupported, gemini
from tests.conftest import closed_after_test
from tests.rig import Rig, cut, rig_fixture  # noqa: F401
from tests.upstream import Reply, Seen

SIG = "EjQKMgEM+/8Z3Rc0aGlzIGlzIGEgc2lnbmF0dXJl/w=="  # canonical base64 with + and /: the same bytes must come back
SIG2 = "Q29ycmVjdCBzZWNvbmQgc2lnbmF0dXJl"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"], "additionalProperties": False}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\r\n\r\n"


def candidate(parts: list[dict[str, Any]], finish: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        c["finishReason"] = finish
    return c


def usage(prompt: int, candidates: int | None = None, thoughts: int | None = None) -> dict[str, int]:
    u = {"promptTokenCount": prompt}
    if candidates is not None:
        u["candidatesTokenCount"] = candidates
    if thoughts is not None:
        u["thoughtsTokenCount"] = thoughts
    u["totalTokenCount"] = prompt + (candidates or 0) + (thoughts or 0)
    return u


# Gemini 3 with includeThoughts: thought summaries, a text part, then the call carrying the signature.
THINK_AND_CALL = b"".join([
    event({"candidates": [candidate([{"text": "**Checking** the weather", "thought": True}])], "usageMetadata": usage(12),
           "modelVersion": "gemini-3-pro-preview", "responseId": "r1"}),
    event({"candidates": [candidate([{"text": " for Paris.\n", "thought": True}])], "usageMetadata": usage(12)}),
    event({"candidates": [candidate([{"text": "Let me look."}])], "usageMetadata": usage(12)}),
    event({"candidates": [candidate([{"functionCall": {"name": "get_weather", "args": {"city": "Paris", "n": [1, 2.5, None]}},
                                      "thoughtSignature": SIG}], "STOP")],
           "usageMetadata": usage(12, 9, 31)}),
])  # fmt: skip
# Parallel calls: only the first carries a signature (thought-signatures docs).
PARALLEL = b"".join([
    event({"candidates": [candidate([{"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}, "thoughtSignature": SIG2},
                                     {"functionCall": {"name": "get_time", "args": {}}}], "STOP")],
           "usageMetadata": usage(7, 11)}),
])  # fmt: skip
ANSWER = event({"candidates": [candidate([{"text": "It is 18 °C in Paris."}], "STOP")], "usageMetadata": usage(40, 8)})


def reply(body: bytes, every: int = 0) -> Reply:
    return Reply(pieces=list(cut(body, list(range(every, len(body), every)))) if every else [body])


def tool_calls_of(result: Any) -> dict[int, dict[str, Any]]:
    """The tool_call events joined per index: the arguments exactly as streamed."""
    calls: dict[int, dict[str, Any]] = {}
    for data in result.of("tool_call"):
        piece = json.loads(data)
        call = calls.setdefault(piece["index"], {"arguments": ""})
        call.update({k: v for k, v in piece.items() if k in ("id", "name")})
        call["arguments"] += piece["arguments"]
    return calls


# --- the stream: /chat/stream ---------------------------------------------------------


@pytest.mark.parametrize("every", [0, 7])
def test_thoughts_call_and_signature_on_chat_stream(rig: Rig, every: int) -> None:
    rig.reset(reply(THINK_AND_CALL, every))
    result = rig.chat("gemini", ASK, model="gemini-3-pro-preview", tools=[WEATHER], reasoning_effort="low")
    assert result.status == 200
    names = [n for n in result.names if n in ("reasoning", "token", "tool_call")]
    assert names == ["reasoning", "reasoning", "token", "tool_call"]  # in part order
    assert "".join(result.of("reasoning")) == "**Checking** the weather for Paris.\n"
    assert result.of("token") == ["Let me look."]
    (call,) = tool_calls_of(result).values()
    assert re.fullmatch(r"call_[A-Za-z0-9_-]{16}", call["id"]) and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris", "n": [1, 2.5, None]}
    (message,) = [json.loads(m) for m in result.of("message")]
    assert message == {
        "role": "assistant", "content": "Let me look.", "reasoning_content": "**Checking** the weather for Paris.\n",
        "tool_calls": [{"id": call["id"], "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]},
                        "extra_content": {"google": {"thought_signature": SIG}}}],
    }  # fmt: skip
    (used,) = [json.loads(u) for u in result.of("usage")]
    assert used == {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52, "reasoning_tokens": 31}
    assert result.of("done") == ["tool_calls"]


def test_parallel_calls_keep_their_indexes_and_the_first_ones_signature(rig: Rig) -> None:
    rig.reset(reply(PARALLEL))
    result = rig.chat("gemini", ASK, tools=[WEATHER, TIME])
    calls = tool_calls_of(result)
    assert [(i, c["name"], json.loads(c["arguments"])) for i, c in calls.items()] == [
        (0, "get_weather", {"city": "Oslo"}), (1, "get_time", {})]  # fmt: skip
    assert calls[0]["id"] != calls[1]["id"]
    (message,) = [json.loads(m) for m in result.of("message")]
    assert [c.get("extra_content") for c in message["tool_calls"]] == [{"google": {"thought_signature": SIG2}}, None]
    assert result.of("done") == ["tool_calls"] and "reasoning" not in result.names


def test_parallel_tool_calls_false_keeps_the_first_call_only(rig: Rig) -> None:
    rig.reset(reply(PARALLEL))
    result = rig.chat("gemini", ASK, tools=[WEATHER, TIME], parallel_tool_calls=False)
    assert [c["name"] for c in tool_calls_of(result).values()] == ["get_weather"]
    assert result.of("done") == ["tool_calls"]


# --- google-genai as the oracle of the stream -----------------------------------------------


def genai_reads(url: str) -> dict[str, Any]:
    """What google-genai extracts from the upstream's bytes: thoughts, text, calls with signatures, usage."""
    options = genai_types.HttpOptions(base_url=url, api_version="v1beta", retry_options=genai_types.HttpRetryOptions(attempts=1))
    out: dict[str, Any] = {"thoughts": "", "text": "", "calls": [], "reasoning_tokens": None, "completion": 0}
    with genai.Client(api_key="AIza-test", http_options=options) as client:
        for chunk in client.models.generate_content_stream(model="gemini-3-pro-preview", contents="hi"):
            if (meta := chunk.usage_metadata) is not None:
                out["reasoning_tokens"] = meta.thoughts_token_count
                out["completion"] = (meta.candidates_token_count or 0) + (meta.thoughts_token_count or 0)
            for part in (chunk.candidates[0].content.parts or []) if chunk.candidates and chunk.candidates[0].content else []:
                if part.function_call is not None:
                    signature = base64.b64encode(part.thought_signature).decode() if part.thought_signature else None
                    out["calls"].append((part.function_call.name, part.function_call.args, signature))
                elif part.text and part.thought:
                    out["thoughts"] += part.text
                elif part.text:
                    out["text"] += part.text
    return out


def gateway_reads(result: Any) -> dict[str, Any]:
    message = json.loads(result.of("message")[0])
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]),
              c.get("extra_content", {}).get("google", {}).get("thought_signature")) for c in message["tool_calls"]]  # fmt: skip
    used = json.loads(result.of("usage")[0])
    return {"thoughts": "".join(result.of("reasoning")), "text": "".join(result.of("token")), "calls": calls,
            "reasoning_tokens": used.get("reasoning_tokens"), "completion": used["completion_tokens"]}  # fmt: skip


@pytest.mark.parametrize("body", [THINK_AND_CALL, PARALLEL], ids=["think_and_call", "parallel"])
def test_google_genai_reads_what_the_gateway_streams(rig: Rig, body: bytes) -> None:
    rig.reset(reply(body, 5))
    mine = gateway_reads(rig.chat("gemini", ASK, tools=[WEATHER, TIME]))
    oracle = genai_reads(rig.upstream.url)
    assert mine == oracle
    assert oracle["calls"]  # not vacuous


# --- the request, with google-genai's own request as the oracle --------------------------------


def camel(value: Any) -> Any:
    """Proto JSON takes snake_case and camelCase names alike; the SDK mixes them."""
    if isinstance(value, dict):
        return {re.sub(r"_([a-z])", lambda m: m[1].upper(), k): camel(v) for k, v in value.items()}
    return [camel(v) for v in value] if isinstance(value, list) else value


def same_bytes(body: dict[str, Any]) -> dict[str, Any]:
    """Signatures and inline data as bytes: base64 may be re-encoded (standard or URL-safe)."""
    for content in body.get("contents", []):
        content.setdefault("role", "user")
        for part in content["parts"]:
            if "thoughtSignature" in part:
                part["thoughtSignature"] = base64.urlsafe_b64decode(part["thoughtSignature"].replace("+", "-").replace("/", "_"))
            if "inlineData" in part:
                part["inlineData"]["data"] = base64.b64decode(part["inlineData"]["data"])
    body.get("systemInstruction", {}).pop("role", None)
    return body


PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "What is in it, and the weather?"},
                                 {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
         "extra_content": {"google": {"thought_signature": SIG}}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
     "reasoning_content": "never sent back",
     "reasoning_details": [{"type": "reasoning.text", "text": "t", "signature": "anthropic", "index": 0}]},
    {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
    {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 18, "unit": "C"}'},
]  # fmt: skip


def test_request_is_what_google_genai_sends(rig: Rig) -> None:
    rig.reset(reply(ANSWER))
    result = rig.chat("gemini", HISTORY, model="gemini-3-pro-preview", tools=[WEATHER, TIME], max_tokens=200,
                      tool_choice={"type": "function", "function": {"name": "get_weather"}}, reasoning_effort="high",
                      response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}})  # fmt: skip
    assert result.of("done") == ["stop"]
    (mine,) = rig.seen
    T = genai_types
    contents = [
        T.Content(role="user", parts=[T.Part(text="What is in it, and the weather?"),
                                      T.Part(inline_data=T.Blob(mime_type="image/png", data=base64.b64decode(PNG)))]),
        T.Content(role="model", parts=[T.Part(text="Checking."),
                                       T.Part(function_call=T.FunctionCall(name="get_weather", args={"city": "Paris"}),
                                              thought_signature=base64.b64decode(SIG)),
                                       T.Part(function_call=T.FunctionCall(name="get_time", args={}))]),
        T.Content(role="user", parts=[T.Part(function_response=T.FunctionResponse(name="get_time", response={"result": "12:00"})),
                                      T.Part(function_response=T.FunctionResponse(name="get_weather",
                                                                                   response={"temp": 18, "unit": "C"}))]),
    ]  # fmt: skip
    declarations = [T.FunctionDeclaration(name="get_weather", description="Weather of a city",
                                          parameters_json_schema=WEATHER["function"]["parameters"]),
                    T.FunctionDeclaration(name="get_time", parameters_json_schema=TIME["function"]["parameters"])]  # fmt: skip
    config = T.GenerateContentConfig(
        system_instruction="Be brief.", max_output_tokens=200, tools=[T.Tool(function_declarations=declarations)],
        tool_config=T.ToolConfig(function_calling_config=T.FunctionCallingConfig(mode="ANY", allowed_function_names=["get_weather"])),
        thinking_config=T.ThinkingConfig(include_thoughts=True, thinking_level="HIGH"),
        response_mime_type="application/json", response_json_schema={"type": "object"},
    )  # fmt: skip
    rig.reset(reply(ANSWER))
    options = T.HttpOptions(base_url=rig.upstream.url, api_version="v1beta", retry_options=T.HttpRetryOptions(attempts=1))
    with genai.Client(api_key="AIza-test", http_options=options) as client:
        list(client.models.generate_content_stream(model="gemini-3-pro-preview", contents=contents, config=config))
    (theirs,) = rig.seen
    assert mine.path == theirs.path
    assert same_bytes(camel(mine.json)) == same_bytes(camel(theirs.json))


def translate(messages: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    request = ChatRequest(messages or ASK, "gemini", fields.pop("model", "gemini-2.0-flash"), fields.pop("max_tokens", 1024), **fields)
    return gemini.translate(request)


@pytest.mark.parametrize(("choice", "config"), [
    ("auto", {"mode": "AUTO"}), ("none", {"mode": "NONE"}), ("required", {"mode": "ANY"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"mode": "ANY", "allowedFunctionNames": ["get_time"]}),
])  # fmt: skip
def test_tool_choice_is_function_calling_config(choice: Any, config: dict[str, Any]) -> None:
    body = translate(tools=[WEATHER, TIME], tool_choice=choice)
    assert body["toolConfig"] == {"functionCallingConfig": config}
    assert [d["name"] for d in body["tools"][0]["functionDeclarations"]] == ["get_weather", "get_time"]


@pytest.mark.parametrize(("model", "effort", "thinking"), [
    ("gemini-3-pro-preview", "low", {"includeThoughts": True, "thinkingLevel": "LOW"}),
    ("gemini-3-flash-preview", "minimal", {"includeThoughts": True, "thinkingLevel": "LOW"}),
    ("gemini-3.1-pro-preview", "medium", {"includeThoughts": True, "thinkingLevel": "HIGH"}),
    ("gemini-2.5-flash", "low", {"includeThoughts": True, "thinkingBudget": 512}),  # half of max_tokens 1024 at most
    ("gemini-2.5-pro", "high", {"includeThoughts": True, "thinkingBudget": 512}),
    ("gemini-2.5-flash", "none", {"thinkingBudget": 0}),
    ("gemini-flash-latest", "low", {"includeThoughts": True, "thinkingBudget": 512}),
    ("gemini-2.0-flash", "none", None),
    ("gemini-2.0-flash", None, None),
])  # fmt: skip
def test_reasoning_effort_is_thinking_config(model: str, effort: str | None, thinking: dict[str, Any] | None) -> None:
    assert translate(model=model, reasoning_effort=effort)["generationConfig"].get("thinkingConfig") == thinking


def test_a_large_max_tokens_gives_the_efforts_budget() -> None:
    body = translate(model="gemini-2.5-flash", max_tokens=8192, reasoning_effort="high")
    assert body["generationConfig"]["thinkingConfig"] == {"includeThoughts": True, "thinkingBudget": 4096}
    body = translate(model="gemini-2.5-flash", max_tokens=8192, reasoning_effort="low")
    assert body["generationConfig"]["thinkingConfig"] == {"includeThoughts": True, "thinkingBudget": 1024}


def test_response_format_is_response_mime_type_and_schema() -> None:
    assert translate(response_format={"type": "json_object"})["generationConfig"]["responseMimeType"] == "application/json"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}
    config = translate(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})["generationConfig"]
    assert config["responseMimeType"] == "application/json" and config["responseJsonSchema"] == schema


def test_function_response_name_comes_from_the_history_and_text_results_are_wrapped() -> None:
    body = translate(HISTORY)
    assert body["contents"][2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_time", "response": {"result": "12:00"}}},
        {"functionResponse": {"name": "get_weather", "response": {"temp": 18, "unit": "C"}}}]}  # fmt: skip
    # a JSON value that is not an object is text too
    body = translate([*HISTORY[:3], {"role": "tool", "tool_call_id": "call_a", "content": "[1, 2]"}])
    assert body["contents"][2]["parts"] == [{"functionResponse": {"name": "get_weather", "response": {"result": "[1, 2]"}}}]


def test_signatures_ride_on_their_own_parts_and_other_reasoning_is_not_sent() -> None:
    (_, model, _) = translate(HISTORY)["contents"]
    assert model == {"role": "model", "parts": [
        {"text": "Checking."},
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": SIG},
        {"functionCall": {"name": "get_time", "args": {}}}]}  # fmt: skip


def test_a_turn_from_another_backend_gets_the_documented_placeholder_on_gemini_3_only() -> None:
    foreign = [{**HISTORY[2], "tool_calls": [{k: v for k, v in c.items() if k != "extra_content"} for c in HISTORY[2]["tool_calls"]]}]
    messages = [HISTORY[1], *foreign, *HISTORY[3:]]
    parts = translate(messages, model="gemini-3-pro-preview")["contents"][1]["parts"]
    assert [p.get("thoughtSignature") for p in parts] == [None, "skip_thought_signature_validator", None]
    parts = translate(messages, model="gemini-2.5-flash")["contents"][1]["parts"]
    assert [p.get("thoughtSignature") for p in parts] == [None, None, None]


def test_plain_text_request_is_unchanged() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]  # fmt: skip
    assert translate(messages, temperature=0.5) == {
        "contents": [{"role": "user", "parts": [{"text": "a\n\nb"}]}, {"role": "model", "parts": [{"text": "c"}]},
                     {"role": "user", "parts": [{"text": "d"}]}],
        "generationConfig": {"maxOutputTokens": 1024, "temperature": 0.5},
        "systemInstruction": {"parts": [{"text": "S"}]},
    }  # fmt: skip


# --- refusals: 400 naming the field, before any upstream call ---------------------------------


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "messages[0].content[0]", "https image URL"),
    ({"messages": [*HISTORY[1:3], {"role": "tool", "tool_call_id": "call_zzz", "content": "x"}]},
     "messages[2].tool_call_id", "names no tool call"),
    ({"messages": [ASK[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "[1]"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "x"}]},
     "messages[1].tool_calls[0].function.arguments", "not a JSON object"),
    ({"model": "gemini-2.0-flash", "reasoning_effort": "high"}, "reasoning_effort", "does not think"),
    ({"model": "gemini-3-pro-preview", "reasoning_effort": "none"}, "reasoning_effort", "cannot turn thinking off"),
    ({"model": "gemini-2.5-pro", "reasoning_effort": "none"}, "reasoning_effort", "cannot turn thinking off"),
    ({"model": "gemini-2.5-pro", "reasoning_effort": "low", "max_tokens": 200}, "reasoning_effort", "least thinking budget"),
])  # fmt: skip
def test_what_gemini_cannot_take_is_refused_naming_the_field(rig: Rig, fields: dict[str, Any], param: str, words: str) -> None:
    rig.reset(reply(ANSWER))
    result = rig.chat("gemini", fields.pop("messages", ASK), **fields)
    assert result.status == 400
    error = json.loads(result.body)["error"]  # /chat/stream names the field in its message (/v1 in `param` too)
    assert error["type"] == "unsupported_parameter" and param in error["message"]
    assert words in error["message"] and "gemini" in error["message"]
    assert rig.seen == []


# --- the loop: a strict fake Gemini, two turns through the gateway ------------------------------


def strict_gemini(seen: Seen) -> Reply:
    """Gemini 3's rule: every functionCall part of the current turn that came with a signature
    comes back with it, the same bytes, on the same part; and each functionResponse names its call."""
    body = seen.json
    model_parts = [p for c in body["contents"] if c["role"] == "model" for p in c["parts"]]
    calls = [p for p in model_parts if "functionCall" in p]
    if not calls:
        return reply(THINK_AND_CALL)
    signed = {"get_weather": SIG}
    for part in calls:
        want = signed.get(part["functionCall"]["name"])
        if want is not None and base64.b64decode(part.get("thoughtSignature", "")) != base64.b64decode(want):
            error = {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                               "message": "Corrupted tool call context: a function call is missing its thought_signature."}}  # fmt: skip
            return Reply(400, "application/json", [json.dumps(error, indent=2).encode()])
    responses = [p["functionResponse"]["name"] for c in body["contents"] for p in c["parts"] if "functionResponse" in p]
    if responses != [p["functionCall"]["name"] for p in calls]:
        return Reply(
            400,
            "application/json",
            [b'{"error": {"code": 400, "message": "function response names differ", "status": "INVALID_ARGUMENT"}}'],
        )
    return reply(ANSWER)


@pytest.fixture(name="strict")
def strict_fixture(rig: Rig) -> Rig:
    original = rig.respond
    rig.respond = strict_gemini  # type: ignore[method-assign]
    rig.reset()
    yield rig
    rig.respond = original  # type: ignore[method-assign]


FIELDS = {"model": "gemini-3-pro-preview", "tools": [WEATHER], "reasoning_effort": "low"}


def test_two_turn_loop_on_chat_stream(strict: Rig) -> None:
    first = strict.chat("gemini", ASK, **FIELDS)
    (message,) = [json.loads(m) for m in first.of("message")]
    call = message["tool_calls"][0]
    history = [*ASK, message, {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 18}'}]
    second = strict.chat("gemini", history, **FIELDS)
    assert second.of("done") == ["stop"] and "".join(second.of("token")) == "It is 18 °C in Paris."
    sent = strict.seen[-1].json["contents"]
    assert sent[1]["parts"][1] == {"functionCall": {"name": "get_weather", "args": {"city": "Paris", "n": [1, 2.5, None]}},
                                   "thoughtSignature": SIG}  # fmt: skip
    assert sent[2]["parts"] == [{"functionResponse": {"name": "get_weather", "response": {"temp": 18}}}]


@pytest.mark.parametrize("signature", [None, base64.b64encode(b"changed").decode()], ids=["dropped", "changed"])
def test_the_strict_fake_refuses_a_lost_or_changed_signature(strict: Rig, signature: str | None) -> None:
    message = json.loads(strict.chat("gemini", ASK, **FIELDS).of("message")[0])
    call = message["tool_calls"][0]
    if signature is None:
        call.pop("extra_content")
        call["function"]["name"] = "get_weather"
        # a client that dropped it on gemini-2.5 (no placeholder there): refused as Gemini refuses
        fields = {**FIELDS, "model": "gemini-2.5-flash"}
    else:
        call["extra_content"]["google"]["thought_signature"] = signature
        fields = FIELDS
    history = [*ASK, message, {"role": "tool", "tool_call_id": call["id"], "content": "18"}]
    result = strict.chat("gemini", history, **fields)
    assert "Corrupted tool call context" in json.loads(result.of("error")[0])["message"]
    assert result.of("done") == ["error"]


def test_two_turn_loop_through_the_openai_sdk(strict: Rig) -> None:
    api = closed_after_test(openai.OpenAI(base_url=strict.gw.url + "/v1", api_key="none", max_retries=0, timeout=30))
    extra = {"reasoning_effort": "low"}
    stream = api.chat.completions.create(model="gemini/gemini-3-pro-preview", messages=ASK, tools=[WEATHER], stream=True,  # type: ignore[list-item,arg-type]
                                         stream_options={"include_usage": True}, **extra)  # fmt: skip
    reasoning, content, calls, extras, used = "", "", {}, {}, None
    for chunk in stream:
        used = chunk.usage or used
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or tc.id
                if tc.function:
                    call["name"] += tc.function.name or ""
                    call["arguments"] += tc.function.arguments or ""
                if (tc.model_extra or {}).get("extra_content"):
                    extras[tc.index] = tc.model_extra["extra_content"]
    assert reasoning == "**Checking** the weather for Paris.\n" and content == "Let me look."
    assert extras == {0: {"google": {"thought_signature": SIG}}}
    assert used is not None and used.completion_tokens_details is not None and used.completion_tokens_details.reasoning_tokens == 31
    call = calls[0]
    assistant = {"role": "assistant", "content": content, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]},
         "extra_content": extras[0]}]}  # fmt: skip
    history = [*ASK, assistant, {"role": "tool", "tool_call_id": call["id"], "content": "18 C"}]
    answer = api.chat.completions.create(model="gemini/gemini-3-pro-preview", messages=history, tools=[WEATHER], **extra)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "It is 18 °C in Paris."
    assert strict.seen[-1].json["contents"][1]["parts"][1]["thoughtSignature"] == SIG


def test_the_non_streaming_v1_message_carries_everything_back(strict: Rig) -> None:
    api = closed_after_test(openai.OpenAI(base_url=strict.gw.url + "/v1", api_key="none", max_retries=0, timeout=30))
    first = api.chat.completions.create(model="gemini/gemini-3-pro-preview", messages=ASK, tools=[WEATHER], reasoning_effort="low")  # type: ignore[list-item]
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.tool_calls
    dumped = message.model_dump(exclude_none=True)
    assert dumped["tool_calls"][0]["extra_content"] == {"google": {"thought_signature": SIG}}
    assert dumped["reasoning_content"] == "**Checking** the weather for Paris.\n"
    history = [*ASK, dumped, {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "18 C"}]
    answer = api.chat.completions.create(model="gemini/gemini-3-pro-preview", messages=history, tools=[WEATHER])  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "It is 18 °C in Paris."


def test_unsupported_is_raised_by_check_itself() -> None:
    with pytest.raises(Unsupported) as refused:
        gemini.check(ChatRequest([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}],
                                 "gemini", "gemini-2.0-flash", 64))  # fmt: skip
    assert refused.value.field == "messages[0].content[0]"
