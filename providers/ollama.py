"""Ollama's native chat API (PROVIDERS.md 6): `POST /api/chat` with the whole
conversation (not `/api/generate` with the last message: that loses the
turns and the model's chat template), answered in NDJSON, done at `done:true`.

Beyond text (DESIGN.md "Beyond text"), in Ollama's own wire form:
- content parts: the text parts joined with newlines as `content`, `data:`
  image parts as the message's `images` (base64, without the `data:`
  prefix); an https image URL is refused (Ollama takes inline images only,
  and the gateway never fetches a client's URL);
- an assistant turn's `tool_calls` go back as
  `{"function": {"name", "arguments": <a JSON object>}}` (Ollama takes
  arguments as objects, not strings), its `reasoning_content` as `thinking`
  (Ollama's Message takes it back, and thinking models' templates use it);
- a `tool` result as `{"role": "tool", "content", "tool_name"}`, the name
  found by its `tool_call_id` in the history (left out when no call has
  that id: the field is optional);
- `tools` as they are (OpenAI's shape is Ollama's); `tool_choice` `auto` is
  Ollama's only behaviour and `none` sends no tools; `required` or a named
  tool is refused (Ollama has no forced tool choice);
- `parallel_tool_calls: false` (Ollama has no such switch) is honoured here:
  only the turn's first call is passed on;
- `reasoning_effort` is `think`: `none` is `false`, any other effort `true`;
  gpt-oss models take a level instead (`low`, `medium`, `high`; `minimal` is
  `low`) and cannot stop reasoning, so `none` is refused for them;
- `response_format` is `format`: `json_object` is `"json"`, `json_schema`
  its schema object.

The stream: `message.thinking` is reasoning (never text); Ollama sends each
tool call whole, arguments as an object, so a call is one ToolCallDelta
(index counted here, Ollama's own `id` when it sends one, else one made by
the gateway; arguments as compact JSON); a turn that called tools and ends
`done_reason: stop` ends `tool_calls`.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncGenerator
from functools import partial
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx
import orjson

from . import (
    ChatRequest,
    Chunk,
    Final,
    Reasoning,
    ToolCallDelta,
    Unsupported,
    Upstream,
    UpstreamError,
    arguments_json,
    body_pieces,
    field_of,
    final_for,
    json_object,
    make_usage,
    new_call_id,
    open_stream,
    text_of,
    upstream_text,
)
from .lines import LineSplitter, ReadToEOF, split_ndjson

DEFAULT_MODEL = "llama3.2"
FINISH_REASONS = {"stop": "stop", "length": "length", "": "stop"}  # no done_reason on a done line: a stop
LEVELS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high"}  # reasoning_effort -> gpt-oss's think level


def takes_levels(model: str) -> bool:
    """gpt-oss models take `think` as a level (true and false are ignored), whatever the tag or namespace."""
    return model.rsplit("/", 1)[-1].lower().startswith("gpt-oss")


def think_of(request: ChatRequest) -> bool | str | None:
    effort = request.reasoning_effort
    if effort is None:
        return None
    if takes_levels(request.model):
        if effort == "none":
            raise Unsupported("reasoning_effort", f"reasoning_effort 'none' is not supported by the ollama backend for "
                                                  f"{request.model}: gpt-oss models always reason (use low, medium or high)")
        return LEVELS[effort]
    return effort != "none"


def check(request: ChatRequest) -> None:
    """Refuse what Ollama cannot honour (a 400 naming the field), before any upstream call."""
    if request.tool_choice not in (None, "auto", "none"):
        shown = "'required'" if request.tool_choice == "required" else "a named tool"
        raise Unsupported("tool_choice", f"tool_choice {shown} is not supported by the ollama backend: Ollama has no forced "
                                         "tool choice (auto and none are)")
    think_of(request)
    ollama_messages(request.messages)


def image_of(url: str, where: str) -> str:
    """A `data:` URL's image as base64; any other URL is refused."""
    if not url.startswith("data:"):
        raise Unsupported(where, f"{where}: the ollama backend takes inline images only (a data: URL), not a URL to fetch")
    header, _, data = url.partition(",")
    if header.endswith(";base64"):
        return data
    return base64.b64encode(unquote_to_bytes(data)).decode("ascii")


def arguments_of(arguments: str, where: str) -> Any:
    """A call's arguments, a JSON string in OpenAI's shape, as the object Ollama takes."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise Unsupported(where, f"{where}: the ollama backend takes a call's arguments as a JSON object")
    return value


def ollama_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation in Ollama's shape; a plain text conversation as is."""
    if all(len(m) == 2 and isinstance(m["content"], str) for m in messages):
        return messages  # {"role", "content": str} each: Ollama's shape already
    names: dict[str, str] = {}  # tool_call_id -> the call's name, from the history
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role, content = message["role"], message.get("content")
        made: dict[str, Any] = {"role": role, "content": text_of(content)}
        if isinstance(content, list):
            images = [image_of(p["image_url"]["url"], f"messages[{i}].content[{j}].image_url")
                      for j, p in enumerate(content) if p.get("type") == "image_url"]  # fmt: skip
            if images:
                made["images"] = images
        if role == "assistant":
            if reasoning := message.get("reasoning_content"):
                made["thinking"] = reasoning
            if calls := message.get("tool_calls"):
                made["tool_calls"] = []
                for k, call in enumerate(calls):
                    function = call["function"]
                    names[call["id"]] = function["name"]
                    arguments = arguments_of(function["arguments"], f"messages[{i}].tool_calls[{k}].function.arguments")
                    made["tool_calls"].append({"function": {"name": function["name"], "arguments": arguments}})
        elif role == "tool" and (name := names.get(message.get("tool_call_id", ""))):
            made["tool_name"] = name
        out.append(made)
    return out


def build_request(upstream: Upstream, request: ChatRequest) -> tuple[str, dict[str, Any], dict[str, str]]:
    options: dict[str, Any] = {"num_predict": request.max_tokens}
    if request.temperature is not None:
        options["temperature"] = request.temperature
    if request.top_p is not None:
        options["top_p"] = request.top_p
    if request.stop:
        options["stop"] = request.stop
    body: dict[str, Any] = {"model": request.model, "messages": ollama_messages(request.messages), "stream": True, "options": options}
    if request.tools and request.tool_choice != "none":
        body["tools"] = request.tools
    if (think := think_of(request)) is not None:
        body["think"] = think
    if request.response_format:
        schema = field_of(request.response_format, "json_schema", "schema")
        body["format"] = schema if isinstance(schema, dict) and request.response_format["type"] == "json_schema" else "json"
    headers = {"content-type": "application/json", "accept": "application/x-ndjson"}
    return upstream.base_url.rstrip("/") + "/api/chat", body, headers


def tool_calls_of(calls: Any, first: int) -> list[ToolCallDelta]:
    """Ollama's whole calls, each one delta (index from `first` on)."""
    deltas: list[ToolCallDelta] = []
    for call in calls if isinstance(calls, list) else []:
        name, arguments = field_of(call, "function", "name"), field_of(call, "function", "arguments")
        given = field_of(call, "id")
        text = arguments if isinstance(arguments, str) else arguments_json(arguments if arguments is not None else {})
        deltas.append(ToolCallDelta(first + len(deltas), given if isinstance(given, str) and given else new_call_id(),
                                    name if isinstance(name, str) else "", text))  # fmt: skip
    return deltas


async def stream_ollama(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
    splitter = LineSplitter()
    final: Final | None = None  # read on to EOF once it is known
    calls = 0  # tool calls passed on in this turn
    most_calls = 1 if request.parallel_tool_calls is False else None
    async with open_stream(http, *build_request(upstream, request)) as response:
        async for lines in ReadToEOF(body_pieces(response), partial(split_ndjson, splitter), partial(split_ndjson, splitter, None)):
            for line in lines:
                if final:
                    continue  # after the done line: read to EOF, ignore
                data = json_object(line, "a line")
                if error := data.get("error"):  # after a 200: the stream's only failure report
                    raise UpstreamError("upstream_error", upstream_text(error))
                message = data.get("message")
                if isinstance(message, dict) and len(message) > 2:  # beyond {role, content}: thinking, tool calls
                    thinking = message.get("thinking")
                    if isinstance(thinking, str) and thinking:
                        yield Reasoning(thinking)
                    for delta in tool_calls_of(message.get("tool_calls"), calls)[: None if most_calls is None else most_calls - calls]:
                        calls += 1
                        yield delta
                text = field_of(message, "content")
                if isinstance(text, str) and text:
                    yield text
                if data.get("done") is True:
                    reason = data.get("done_reason")
                    usage = make_usage(data.get("prompt_eval_count"), data.get("eval_count"))  # 0 counts are omitted
                    final = final_for(reason if isinstance(reason, str) else "", FINISH_REASONS, usage)
                    if calls and final.finish_reason == "stop" and reason == "stop":  # Ollama ends a tool turn with stop
                        final = Final("tool_calls", final.usage)
    if final is None:
        raise UpstreamError("protocol_error", "the upstream stream ended before its done line")
    yield final
