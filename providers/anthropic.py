"""Anthropic Messages streaming (PROVIDERS.md 5): typed SSE events. `text_delta`s
are answer text, `thinking_delta`s reasoning, a `tool_use` block's start and its
`input_json_delta`s a tool call; the signatures of thinking blocks (and the data
of redacted ones) come back in the Final's round trip, as `reasoning_details`,
for the next request to return unchanged. The stream is complete at `message_stop`.

The request is OpenAI's chat shape translated (DESIGN.md "Beyond text"): tool
calls and results as `tool_use` / `tool_result` blocks, images as image blocks,
`reasoning_effort` as a thinking budget taken out of `max_tokens`,
`response_format` json_schema as structured output; what Anthropic refuses
(thinking with a forced tool or another temperature, a budget max_tokens cannot
hold, json_object) is refused here first, naming the field.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import orjson

from . import (
    ChatRequest,
    Chunk,
    Final,
    Reasoning,
    RoundTrip,
    ToolCallDelta,
    Unsupported,
    Upstream,
    UpstreamError,
    body_pieces,
    field_of,
    final_for,
    json_object,
    make_usage,
    open_stream,
    text_of,
)
from .lines import ReadToEOF, SSEDecoder

DEFAULT_MODEL = "claude-sonnet-4-20250514"
VERSION = "2023-06-01"
FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}  # fmt: skip
HANDLED = frozenset({"message_start", "content_block_start", "content_block_delta", "message_delta", "message_stop", "error"})
BACKEND = "anthropic"

# --- reasoning budget: taken out of max_tokens (OpenAI's meaning: the whole output) ---------
MIN_BUDGET = 1024  # Anthropic's minimum `budget_tokens`, which must also stay below max_tokens
EFFORT_SHARE = {"minimal": 0.0, "low": 0.25, "medium": 0.5, "high": 0.75}  # of max_tokens, at least MIN_BUDGET
# Where reasoning_details come from: OpenRouter's name for Anthropic's signed thinking. Entries
# that name another format came from another provider and are never sent here.
FORMAT = "anthropic-claude-v1"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")  # what Anthropic's image blocks take
DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,(.*)", re.DOTALL)


def budget_for(request: ChatRequest) -> int:
    """The thinking budget for the request's effort, refused when max_tokens leaves none."""
    effort = str(request.reasoning_effort)
    budget = max(MIN_BUDGET, int(request.max_tokens * EFFORT_SHARE[effort]))
    if budget >= request.max_tokens:
        raise Unsupported("max_tokens", f"max_tokens {request.max_tokens} is too small for reasoning_effort {effort!r} on the "
                          f"{BACKEND} backend: its thinking budget ({budget}) must be at least {MIN_BUDGET} tokens and less "
                          "than max_tokens (which counts the reasoning and the answer)")  # fmt: skip
    return budget


def signed_thinking(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An assistant turn's Anthropic thinking blocks, as its reasoning_details carry them back, unchanged."""
    blocks: list[dict[str, Any]] = []
    for detail in message.get("reasoning_details") or []:
        if detail.get("format", FORMAT) != FORMAT:
            continue  # another provider's reasoning: never sent to this one
        kind = detail.get("type")
        if kind == "reasoning.text" and isinstance(detail.get("signature"), str) and detail["signature"]:
            blocks.append({"type": "thinking", "thinking": str(detail.get("text") or ""), "signature": detail["signature"]})
        elif kind == "reasoning.encrypted" and isinstance(detail.get("data"), str) and detail["data"]:
            blocks.append({"type": "redacted_thinking", "data": detail["data"]})
    return blocks


def thinks(request: ChatRequest) -> bool:
    """Whether the request runs with thinking: asked for, and not continuing a tool loop
    (tool results after the last assistant message) whose turn began without Anthropic's
    signed thinking. A tool-use loop is one assistant turn, and with thinking on it must
    begin with its thinking blocks: such a turn continues without thinking (DESIGN.md)."""
    if request.reasoning_effort in (None, "none"):
        return False
    messages = request.messages
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistants or all(m["role"] != "tool" for m in messages[assistants[-1] + 1 :]):
        return True  # a new turn: nothing to continue
    last_user = max((i for i, m in enumerate(messages[: assistants[-1]]) if m["role"] == "user"), default=-1)
    first = next(i for i in assistants if i > last_user)
    return bool(signed_thinking(messages[first]))


def image_block(url: str, where: str) -> dict[str, Any]:
    if url.startswith("https://"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    match = DATA_URL.fullmatch(url)
    if match is None or match[1] not in IMAGE_TYPES:
        raise Unsupported(where, f"{where}: the {BACKEND} backend takes images as base64 data: URLs of "
                          f"{', '.join(IMAGE_TYPES)} (or https URLs)")  # fmt: skip
    return {"type": "image", "source": {"type": "base64", "media_type": match[1], "data": match[2]}}


def blocks_of(content: Any, where: str, images: bool = True) -> list[dict[str, Any]]:
    """Message content as Anthropic content blocks (empty text is left out: Anthropic refuses it)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content or []):
        if part["type"] == "text":
            blocks += [{"type": "text", "text": part["text"]}] if part["text"] else []
        elif images:
            blocks.append(image_block(part["image_url"]["url"], f"{where}.content[{j}]"))
        else:
            raise Unsupported(f"{where}.content[{j}]", f"{where}.content[{j}]: the {BACKEND} backend takes images in user "
                              "and tool messages only")  # fmt: skip
    return blocks


def tool_use_of(call: dict[str, Any], where: str) -> dict[str, Any]:
    arguments = call["function"]["arguments"]
    try:
        value = orjson.loads(arguments) if arguments.strip() else {}
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise Unsupported(f"{where}.function.arguments", f"{where}.function.arguments must be a JSON object for the "
                          f"{BACKEND} backend (its tool_use input), got {arguments[:100]!r}")  # fmt: skip
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": value}


def turn_of(message: dict[str, Any], where: str) -> tuple[str, Any]:
    """One message as an Anthropic turn: (role, content). Plain text stays a string, as it always was."""
    role, content = message["role"], message.get("content")
    if role == "tool":
        result: Any = content if isinstance(content, str) else blocks_of(content, where)
        return "user", [{"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": result}]
    thinking = signed_thinking(message) if role == "assistant" else []
    calls = message.get("tool_calls") or []
    if isinstance(content, str) and not thinking and not calls:
        return role, content
    blocks = [*thinking, *blocks_of(content, where, images=role == "user")]
    blocks += [tool_use_of(call, f"{where}.tool_calls[{k}]") for k, call in enumerate(calls)]
    return role, blocks


def merged(first: Any, second: Any) -> Any:
    """Two consecutive turns of one role as one (Anthropic wants turns to alternate)."""
    if isinstance(first, str) and isinstance(second, str):
        return first + "\n\n" + second
    as_blocks = [c if isinstance(c, list) else [{"type": "text", "text": c}] if c else [] for c in (first, second)]
    return as_blocks[0] + as_blocks[1]


def system_and_turns(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The system messages joined into one prompt, and the other messages as
    Anthropic turns, consecutive same-role turns merged."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message["role"] == "system":
            content = message["content"]
            if not isinstance(content, str) and any(p["type"] != "text" for p in content):
                raise Unsupported(f"messages[{i}]", f"messages[{i}]: the {BACKEND} backend takes text system messages only")
            system.append(text_of(content))
            continue
        role, content = turn_of(message, f"messages[{i}]")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = merged(turns[-1]["content"], content)
        else:
            turns.append({"role": role, "content": content})
    return "\n\n".join(system), turns


def tools_of(request: ChatRequest, thinking: bool) -> dict[str, Any]:
    """`tools`, `tool_choice` and `parallel_tool_calls` in Anthropic's fields."""
    if not request.tools:
        return {}
    tools = []
    for tool in request.tools:
        function = tool["function"]
        made = {"name": function["name"], "input_schema": function.get("parameters") or {"type": "object"}}
        if isinstance(function.get("description"), str):
            made["description"] = function["description"]
        tools.append(made)
    choice = request.tool_choice
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    if thinking and (choice == "required" or named):
        raise Unsupported("tool_choice", f"tool_choice {'required' if named is None else 'naming a function'} cannot be "
                          f"combined with reasoning_effort on the {BACKEND} backend: Anthropic refuses a forced tool "
                          "with thinking (use auto, or no reasoning_effort)")  # fmt: skip
    kind = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}, None: {"type": "auto"}}
    tool_choice: dict[str, Any] = {"type": "tool", "name": named} if named else dict(kind[choice])
    if request.parallel_tool_calls is False and tool_choice["type"] != "none":
        tool_choice["disable_parallel_tool_use"] = True
    if choice is None and len(tool_choice) == 1:
        return {"tools": tools}
    return {"tools": tools, "tool_choice": tool_choice}


def output_format(request: ChatRequest) -> dict[str, Any]:
    """response_format as Anthropic's structured output (`output_config.format`): a JSON
    schema only. json_object names no schema, and Anthropic's has no "any object"."""
    response_format = request.response_format
    if response_format is None:
        return {}
    schema = field_of(response_format, "json_schema", "schema")
    if response_format["type"] != "json_schema" or not isinstance(schema, dict) or not schema:
        raise Unsupported("response_format", f"response_format {response_format['type']} without a schema is not "
                          f"supported by the {BACKEND} backend: its structured output takes a json_schema with its schema")  # fmt: skip
    return {"output_config": {"format": {"type": "json_schema", "schema": schema}}}


def build_body(request: ChatRequest) -> dict[str, Any]:
    """The Messages API request body; raises Unsupported for what cannot be honoured."""
    system, turns = system_and_turns(request.messages)
    body: dict[str, Any] = {"model": request.model, "max_tokens": request.max_tokens, "messages": turns, "stream": True}
    if system:
        body["system"] = system
    thinking = thinks(request)
    if thinking:
        if request.temperature is not None and request.temperature != 1:
            raise Unsupported("temperature", f"temperature {request.temperature} cannot be combined with reasoning_effort "
                              f"on the {BACKEND} backend: Anthropic takes thinking only at temperature 1")  # fmt: skip
        if request.top_p is not None and not 0.95 <= request.top_p <= 1:
            raise Unsupported("top_p", f"top_p {request.top_p} cannot be combined with reasoning_effort on the {BACKEND} "
                              "backend: Anthropic takes thinking only with top_p from 0.95 to 1")  # fmt: skip
        body["thinking"] = {"type": "enabled", "budget_tokens": budget_for(request)}
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop_sequences"] = request.stop
    body.update(tools_of(request, thinking))
    body.update(output_format(request))
    return body


def check(request: ChatRequest) -> None:
    """Refuses (Unsupported) what the Anthropic backend cannot honour, before any upstream call."""
    build_body(request)


def build_request(upstream: Upstream, request: ChatRequest) -> tuple[str, dict[str, Any], dict[str, str]]:
    headers = {"x-api-key": upstream.api_key, "anthropic-version": VERSION,
               "content-type": "application/json", "accept": "text/event-stream"}
    return upstream.base_url.rstrip("/") + "/v1/messages", build_body(request), headers


def prompt_tokens(usage: Any) -> int | None:
    """Input tokens, cache reads and writes included (as OpenAI counts them)."""
    counts = [field_of(usage, k) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")]
    return sum(c for c in counts if isinstance(c, int)) if isinstance(counts[0], int) else None


@dataclass(slots=True)
class Blocks:
    """The content blocks of one message beyond its text, by Anthropic's block index."""

    calls: dict[int, int] = field(default_factory=dict)  # tool_use block index -> tool call index (from 0)
    thinking: dict[int, list[str]] = field(default_factory=dict)  # thinking block index -> its text
    signatures: dict[int, str] = field(default_factory=dict)
    redacted: dict[int, str] = field(default_factory=dict)  # redacted_thinking block index -> its data

    def start(self, index: Any, block: Any) -> Chunk | None:
        if not isinstance(index, int):
            return None  # a block no delta could name (R5: tolerate)
        kind = field_of(block, "type")
        if kind == "tool_use":
            call = self.calls.setdefault(index, len(self.calls))
            name, call_id = block.get("name"), block.get("id")
            return ToolCallDelta(call, call_id if isinstance(call_id, str) else None, name if isinstance(name, str) else None)
        if kind == "thinking":
            if isinstance(signature := block.get("signature"), str) and signature:
                self.signatures[index] = signature
            text = block.get("thinking")
            self.thinking.setdefault(index, []).append(text if isinstance(text, str) else "")
            return Reasoning(text) if isinstance(text, str) and text else None
        if kind == "redacted_thinking" and isinstance(block.get("data"), str):
            self.redacted[index] = block["data"]
        elif kind == "text" and isinstance(text := block.get("text"), str) and text:
            return text
        return None

    def delta(self, index: Any, delta: Any) -> Chunk | None:
        if not isinstance(index, int):
            return None
        kind = field_of(delta, "type")
        if kind == "thinking_delta" and isinstance(text := delta.get("thinking"), str) and text:
            self.thinking.setdefault(index, []).append(text)
            return Reasoning(text)
        if kind == "signature_delta" and isinstance(signature := delta.get("signature"), str):
            self.signatures[index] = signature  # sent whole, once (the SDK keeps the last one)
        elif kind == "input_json_delta" and index in self.calls and isinstance(part := delta.get("partial_json"), str) and part:
            return ToolCallDelta(self.calls[index], arguments=part)
        return None

    def round_trip(self) -> RoundTrip | None:
        """The signed and redacted thinking, in block order, for the next request."""
        details: list[dict[str, Any]] = []
        for index in sorted({*self.signatures, *self.redacted}):
            if index in self.redacted:
                details.append({"type": "reasoning.encrypted", "data": self.redacted[index]})
            else:
                text = "".join(self.thinking.get(index, []))
                details.append({"type": "reasoning.text", "text": text, "signature": self.signatures[index]})
            details[-1].update(format=FORMAT, index=len(details) - 1)
        return RoundTrip(reasoning_details=details) if details else None


def usage_of(counts: Any, prompt: int | None) -> dict[str, Any]:
    thought = field_of(counts, "output_tokens_details", "thinking_tokens")
    reasoning = thought if isinstance(thought, int) and not isinstance(thought, bool) else None
    return make_usage(prompt_tokens(counts) or prompt, field_of(counts, "output_tokens"), reasoning_tokens=reasoning)


async def stream_anthropic(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
    decoder = SSEDecoder()
    prompt: int | None = None
    stop_reason: str | None = None
    usage: dict[str, Any] | None = None  # only once message_delta brought the final counts
    final: Final | None = None  # read on to EOF once it is known
    blocks = Blocks()
    async with open_stream(http, *build_request(upstream, request)) as response:
        async for events in ReadToEOF(body_pieces(response), decoder.feed, decoder.finish):
            for event in events:
                if event.event not in HANDLED or final:
                    continue  # ping, block stops, event types added later (R5); the rest is read to EOF
                data = json_object(event.data, f"a {event.event} event")
                if event.event == "content_block_delta":
                    delta = data.get("delta")
                    if field_of(delta, "type") == "text_delta":
                        text = field_of(delta, "text")
                        if isinstance(text, str) and text:
                            yield text
                    elif (piece := blocks.delta(data.get("index"), delta)) is not None:
                        yield piece
                elif event.event == "content_block_start":
                    if (piece := blocks.start(data.get("index"), data.get("content_block"))) is not None:
                        yield piece
                elif event.event == "message_start":
                    prompt = prompt_tokens(field_of(data, "message", "usage"))
                elif event.event == "message_delta":
                    stop_reason = field_of(data, "delta", "stop_reason") or stop_reason
                    usage = usage_of(data.get("usage"), prompt)  # cumulative; newer APIs repeat the input counts here
                elif event.event == "message_stop":
                    if not isinstance(stop_reason, str):
                        raise UpstreamError("protocol_error", "the upstream sent message_stop without a stop_reason", usage=usage)
                    final = replace(final_for(stop_reason, FINISH_REASONS, usage), round_trip=blocks.round_trip())
                else:  # error
                    failure = UpstreamError.reported(field_of(data, "error", "message"), field_of(data, "error", "type"), usage=usage)
                    failure.retryable = failure.upstream_type == "overloaded_error"  # before any text: worth another attempt
                    raise failure
    if final is None:
        raise UpstreamError("protocol_error", "the upstream stream ended before message_stop", usage=usage)
    yield final
