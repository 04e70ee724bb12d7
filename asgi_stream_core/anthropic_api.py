"""Anthropic's Messages API as a front door (`/v1/messages`,
`/v1/messages/count_tokens`), so Claude Code and the anthropic SDKs can use
every backend: Anthropic's content blocks become the same ChatRequest (the
chat shape), the gateway's own generation and writer run it, and only the
framing (typed events, one content block at a time) and the error shape are
Anthropic's. What is shared with the OpenAI door (the model's route, the
wait for the first output, the error status) is openai_api.py's."""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass
from typing import Any, cast

import orjson

from asgi_stream_core import chat_shape
from asgi_stream_core.config import Config, check_request
from asgi_stream_core.metrics import estimated_usage, prompt_chars
from asgi_stream_core.openai_api import (
    MAX_STOP_SEQUENCES,
    CompletionFramer,
    answer,
    dumps,
    flag,
    json_object_body,
    number,
    route_model,
    send_json,
    served_model,
    upstream_status,
)
from asgi_stream_core.record import StreamRecord
from asgi_stream_core.services import Services
from asgi_stream_core.types import Refusal, invalid, shown, unsupported
from asgi_stream_core.web import Exchange
from providers import ChatRequest, UpstreamError, writable

# --- errors in Anthropic's shape ------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error",
               529: "overloaded_error"}  # fmt: skip
KNOWN_TYPES = frozenset({*ERROR_TYPES.values(), "api_error"})


def anthropic_error_type(status: int) -> str:
    """Anthropic's error `type` for a status (the SDKs pick their exception class by the status)."""
    return ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def error_object(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_body(refusal: Refusal) -> bytes:
    """A refusal in Anthropic's shape (it has no field for the parameter: the message names it)."""
    return dumps(error_object(anthropic_error_type(refusal.status), refusal.message))


def failure_object(error: UpstreamError) -> dict[str, Any]:
    """A failed generation: an Anthropic upstream's own error type is kept (overloaded_error stays one)."""
    kind = error.upstream_type if error.upstream_type in KNOWN_TYPES else anthropic_error_type(upstream_status(error))
    return error_object(str(kind), error.message)


# --- the request: Anthropic's body to a ChatRequest ----------------------------------------


@dataclass(frozen=True, slots=True)
class MessagesCall:
    """A validated Messages API request."""

    request: ChatRequest
    model: str  # "<backend>/<model>": the name the answer carries
    stream: bool


def parse_messages_request(body: bytes, config: Config, counting: bool = False) -> MessagesCall:
    """Validate an Anthropic request body; refuse, naming it, what the gateway
    cannot carry to every backend. Fields it does not know (`metadata`,
    `cache_control` on blocks, ...) are ignored, as they change no answer.
    `counting`: for count_tokens, where max_tokens is not required."""
    fields = json_object_body(body)
    if fields.get("top_k") is not None:
        raise unsupported("top_k is not supported: not every backend could honour it", "top_k")
    backend, model = route_model(fields.get("model"), config)
    messages = [*system_of(fields.get("system")), *messages_of(fields.get("messages"))]
    max_tokens = fields.get("max_tokens")
    if max_tokens is None and counting:
        max_tokens = config.max_tokens
    elif type(max_tokens) is not int or not 1 <= max_tokens <= config.max_tokens_limit:
        raise invalid(f"max_tokens is required: an integer from 1 to {config.max_tokens_limit} "
                      f"(the gateway's MAX_TOKENS_LIMIT), got {shown(max_tokens)}", "max_tokens")  # fmt: skip
    tools = chat_shape.tools_of(function_tools(fields.get("tools")))
    tool_choice, parallel = tool_choice_of(fields.get("tool_choice"), tools)
    request = ChatRequest(messages, backend, model, max_tokens, number(fields, "temperature", 1.0), number(fields, "top_p", 1.0),
                          stop_sequences_of(fields.get("stop_sequences")), tools, tool_choice, parallel,
                          effort_of(fields.get("thinking"), fields.get("output_config"), max_tokens))  # fmt: skip
    return MessagesCall(request if counting else check_request(request, config), config.model_name(backend, model), flag(fields, "stream"))


def system_of(value: Any) -> list[dict[str, Any]]:
    """`system`, a string or text blocks, as one system message (none if empty)."""
    if value is None or isinstance(value, str):
        return [{"role": "system", "content": value}] if value else []
    if not isinstance(value, list) or not all(isinstance(b, dict) and b.get("type") == "text" for b in value):
        raise invalid(f"system must be a string or an array of text blocks, got {shown(value)}", "system")
    text = chat_shape.text_parts(value, "system")
    return [{"role": "system", "content": text}] if text else []


def messages_of(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty array of {role, content} objects", "messages")
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant", "system"):  # system: Claude Code sends instructions mid-conversation so
            raise invalid(f"{where}.role must be user, assistant or system, got {shown(role)}", f"{where}.role")
        content = message.get("content")
        if role == "system":
            messages += system_of(content)
        elif isinstance(content, str):
            messages.append({"role": role, "content": content})
        elif not isinstance(content, list) or not all(isinstance(block, dict) for block in content):
            raise invalid(f"{where}.content must be a string or an array of content blocks", f"{where}.content")
        else:
            messages += user_turn(content, where) if role == "user" else [assistant_turn(content, where)]
    return messages


def user_turn(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """A user turn: its tool results as tool messages (Anthropic puts them first),
    then what the user wrote, if anything, as a user message."""
    results, parts = [], []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        if block.get("type") == "tool_result":
            results.append(tool_message(block, at))
        else:
            parts.append(part_of(block, at))
    if parts or not results:
        return [*results, {"role": "user", "content": chat_shape.text_parts(parts, where)}]
    return results


def part_of(block: dict[str, Any], at: str) -> dict[str, Any]:
    """A text or image block as a chat part; an image's base64 as a data: URL."""
    kind = block.get("type")
    if kind == "text":
        return block  # text_parts checks its text
    source = block.get("source") if kind == "image" else None
    if not isinstance(source, dict):
        raise unsupported(f"{at} is a {shown(kind)} block: the gateway takes text, image, tool_use, tool_result and thinking", at)
    if source.get("type") == "base64" and isinstance(source.get("media_type"), str) and isinstance(source.get("data"), str):
        return {"type": "image_url", "image_url": {"url": f"data:{source['media_type']};base64,{source['data']}"}}
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}  # text_parts takes https only
    raise unsupported(f"{at}.source must be base64 or an https url, got {shown(source)}", f"{at}.source")


def tool_message(block: dict[str, Any], at: str) -> dict[str, Any]:
    """A tool_result as a tool message. Its `is_error` has no place in the chat
    shape: the result's text is what says what went wrong, to every backend."""
    call_id, content = block.get("tool_use_id"), block.get("content", "")
    if not isinstance(call_id, str) or not call_id:
        raise invalid(f"{at}.tool_use_id must name the tool_use this answers, got {shown(call_id)}", f"{at}.tool_use_id")
    if isinstance(content, list) and all(isinstance(b, dict) for b in content):
        content = chat_shape.text_parts([part_of(b, f"{at}.content[{k}]") for k, b in enumerate(content)], at)
    elif not isinstance(content, str):
        raise invalid(f"{at}.content must be a string or an array of text and image blocks", f"{at}.content")
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def assistant_turn(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """An assistant turn: text, tool_use blocks as tool calls, and its thinking
    carried back: the text as reasoning_content, and signed or redacted blocks,
    unchanged and in order, as reasoning_details (the Anthropic backend sends
    them back as the same blocks)."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    thoughts: list[str] = []
    details: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at, kind = f"{where}.content[{j}]", block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(tool_call_of(block, at))
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thoughts.append(block["thinking"])
            if isinstance(signature := block.get("signature"), str) and signature:  # unsigned: from a backend that signs nothing
                details.append({"type": "reasoning.text", "text": block["thinking"], "signature": signature, "index": len(details)})
        elif kind == "redacted_thinking" and isinstance(block.get("data"), str):
            details.append({"type": "reasoning.encrypted", "data": block["data"], "index": len(details)})
        else:
            raise invalid(f"{at}: an assistant turn takes text, tool_use, thinking and redacted_thinking blocks, got {shown(block)}", at)
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    if thoughts:
        message["reasoning_content"] = "".join(thoughts)
    if details:
        message["reasoning_details"] = details
    return message


def tool_call_of(block: dict[str, Any], at: str) -> dict[str, Any]:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name or not isinstance(arguments, dict):
        raise invalid(f"{at}: a tool_use block needs an id, a name and an input object, got {shown(block)}", at)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": dumps(arguments).decode()}}


def function_tools(value: Any) -> Any:
    """Anthropic's client tools as function tools; a server tool (web search,
    code execution, ...) runs at Anthropic alone: refused."""
    if not isinstance(value, list):
        return value  # tools_of refuses what is not a list
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            raise unsupported(f"tools[{i}]: only client tools {{name, description, input_schema}} are supported, "
                              f"got {shown(tool)}", f"tools[{i}]")  # fmt: skip
        function = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    return tools


def tool_choice_of(value: Any, tools: list[dict[str, Any]] | None) -> tuple[Any, bool | None]:
    """`tool_choice` (auto, any, tool, none) and its disable_parallel_tool_use, in the chat shape."""
    if value is None:
        return None, None
    kind = value.get("type") if isinstance(value, dict) else None
    named = {"type": "function", "function": {"name": value.get("name")}} if kind == "tool" else None
    chosen: Any = named or {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))
    if chosen is None:
        raise invalid(f"tool_choice must be {{type: auto | any | tool | none}}, got {shown(value)}", "tool_choice")
    single = chat_shape.flag_of(value.get("disable_parallel_tool_use"), "tool_choice.disable_parallel_tool_use")
    return chat_shape.tool_choice_of(chosen, tools), None if single is None else not single


def effort_of(thinking: Any, output: Any, max_tokens: int) -> str | None:
    """`thinking` as a reasoning effort: a budget by its share of max_tokens (the
    Anthropic backend takes an effort back out of max_tokens by the same shares),
    adaptive thinking by `output_config.effort` (max as high; medium if none),
    disabled as none asked."""
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if thinking is None or kind == "disabled":
        return None
    if kind == "adaptive":
        effort = output.get("effort") if isinstance(output, dict) else None
        return {"low": "low", "high": "high", "max": "high"}.get(str(effort), "medium")
    budget = thinking.get("budget_tokens") if kind == "enabled" else None
    if type(budget) is not int or budget < 1:
        raise invalid(f"thinking must be {{type: enabled, budget_tokens}}, adaptive or disabled, got {shown(thinking)}", "thinking")
    share = budget / max_tokens
    return "low" if share <= 0.25 else "medium" if share <= 0.5 else "high"


def stop_sequences_of(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in value):
        raise invalid(f"stop_sequences must be up to {MAX_STOP_SEQUENCES} non-empty strings "
                      f"(as many as every backend takes), got {shown(value)}", "stop_sequences")  # fmt: skip
    return value or None


# --- the answer: Anthropic's typed events, or one Message object ---------------------------

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


def frame_event(kind: str, payload: dict[str, Any]) -> bytes:
    """One named event, its data an object whose `type` is its name, as Anthropic sends."""
    return b"event: " + kind.encode() + b"\ndata: " + dumps({"type": kind, **payload}) + b"\n\n"


def message_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    counts = usage or {}
    return {"input_tokens": int(counts.get("prompt_tokens") or 0), "output_tokens": int(counts.get("completion_tokens") or 0)}


def turn_of(record: StreamRecord) -> dict[str, Any]:
    """The turn's `message` event (reasoning, tool calls and signatures); {} for text alone."""
    return next((orjson.loads(data) for name, _, data in record.log.entries(0) or () if name == b"message"), {})


def signed_details(turn: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The turn's signed thinking and its redacted thinking (reasoning_details by type)."""
    details = [d for d in turn.get("reasoning_details") or () if isinstance(d, dict)]
    signed = [d for d in details if d.get("type") == "reasoning.text" and isinstance(d.get("signature"), str) and d["signature"]]
    return signed, [d for d in details if d.get("type") == "reasoning.encrypted" and isinstance(d.get("data"), str)]


def tool_use_input(arguments: str) -> Any:
    """A call's arguments as the input object; arguments the model wrote that are
    no JSON object, or one nested deeper than it can be written again (orjson
    reads 1,024 levels, writes 254), stay whole, as text, rather than being dropped."""
    try:
        value = orjson.loads(arguments) if arguments.strip() else {}
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) and writable(value) is not None else {"arguments": arguments}


class MessageFramer:
    """A turn's events read as Anthropic's stream: message_start, then one content
    block at a time (thinking from `reasoning`, text from `token`, tool_use from
    `tool_call`), then message_delta (stop reason, usage) and message_stop, or
    after a failure an `error` event alone. The request's own client is its only
    reader and reads in order (no resume on this route), so the framer keeps which
    block is open.

    A thinking block's signature comes with the turn's `message`, at its end; by
    then the block may be closed (the answer followed it), so its signature_delta
    comes after its content_block_stop, by its index, which is how the SDKs'
    accumulators apply deltas: get_final_message() has the thinking signed."""

    resumable = False
    encode = staticmethod(CompletionFramer.encode)  # held as the OpenAI door holds them (a lone surrogate stays one)
    decode = staticmethod(CompletionFramer.decode)

    def __init__(self, call: MessagesCall, stream_id: str):
        self.call = call
        self.id = f"msg_{stream_id}"
        self.blocks = 0  # content blocks started
        self.open_kind: str | None = None  # the open block's type
        self.open_index = -1
        self.tool_blocks: dict[int, int] = {}  # tool call index -> its block's index
        self.thinking_blocks: list[int] = []  # the thinking blocks' indexes, in order

    def frame(self, record: StreamRecord, position: int) -> bytes | None:
        entries = record.log.entries(position)
        if entries is None:  # dropped past the bound before this client read them: it is let go (openai_api.answer)
            return None
        frames = []
        for name, _, data in entries:
            if name == b"token":
                frames.append(self.text_delta("text", {"type": "text", "text": ""}, {"type": "text_delta", "text": self.decode(data)}))
            elif name == b"reasoning":
                block = {"type": "thinking", "thinking": "", "signature": ""}
                frames.append(self.text_delta("thinking", block, {"type": "thinking_delta", "thinking": self.decode(data)}))
            elif name == b"tool_call":
                frames.append(self.tool_call(orjson.loads(data)))
            elif name == b"message":
                frames.append(self.signatures(orjson.loads(data)))
            elif name == b"done":
                frames.append(self.ending(record))
        return b"".join(frames)

    def start(self, block: dict[str, Any]) -> bytes:
        """Close the open block and start `block`."""
        stop = self.stop()
        self.open_kind, self.open_index = block["type"], self.blocks
        self.blocks += 1
        if block["type"] == "thinking":
            self.thinking_blocks.append(self.open_index)
        return stop + frame_event("content_block_start", {"index": self.open_index, "content_block": block})

    def stop(self) -> bytes:
        if self.open_kind is None:
            return b""
        self.open_kind = None
        return frame_event("content_block_stop", {"index": self.open_index})

    def text_delta(self, kind: str, block: dict[str, Any], delta: dict[str, Any]) -> bytes:
        """Text or thinking: into the open block of its kind, else into a new one."""
        start = b"" if self.open_kind == kind else self.start(block)
        return start + frame_event("content_block_delta", {"index": self.open_index, "delta": delta})

    def tool_call(self, piece: dict[str, Any]) -> bytes:
        """A call's first event starts its block; a later piece of a call whose block
        was closed by another (parallel calls interleaved) goes to its own index."""
        start = b""
        if "id" in piece:
            start = self.start({"type": "tool_use", "id": piece["id"], "name": piece["name"], "input": {}})
            self.tool_blocks[piece["index"]] = self.open_index
        if not piece["arguments"]:
            return start
        delta = {"type": "input_json_delta", "partial_json": piece["arguments"]}
        return start + frame_event("content_block_delta", {"index": self.tool_blocks[piece["index"]], "delta": delta})

    def signatures(self, turn: dict[str, Any]) -> bytes:
        """Each streamed thinking block's signature, in order; signed thinking beyond
        them, and redacted thinking, which stream no text, as whole blocks."""
        signed, redacted = signed_details(turn)
        frames = [frame_event("content_block_delta", {"index": index, "delta": {"type": "signature_delta", "signature": d["signature"]}})
                  for index, d in zip(self.thinking_blocks, signed, strict=False)]  # fmt: skip
        wholes = [{"type": "thinking", "thinking": str(d.get("text") or ""), "signature": d["signature"]}
                  for d in signed[len(self.thinking_blocks) :]]  # fmt: skip
        frames += [self.start(block) for block in [*wholes, *({"type": "redacted_thinking", "data": d["data"]} for d in redacted)]]
        return b"".join(frames)

    def head(self, record: StreamRecord) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": served_model(record, self.call.model), "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": message_usage(record.usage)}  # fmt: skip

    def opening(self, record: StreamRecord) -> bytes:
        return frame_event("message_start", {"message": self.head(record)})

    def ending(self, record: StreamRecord) -> bytes:
        """An error ends the stream at once; otherwise the open block's stop, the stop reason and usage, message_stop."""
        if record.error is not None:
            return frame_event("error", {"error": failure_object(record.error)["error"]})
        delta = {"stop_reason": STOP_REASONS.get(str(record.finish_reason), "end_turn"), "stop_sequence": None}
        return self.stop() + frame_event("message_delta", {"delta": delta, "usage": message_usage(record.usage)}) + \
            frame_event("message_stop", {})  # fmt: skip

    def message_object(self, record: StreamRecord) -> dict[str, Any]:
        """The whole answer, for a request that did not ask to stream: thinking, text, tool_use."""
        turn = turn_of(record)
        signed, redacted = signed_details(turn)
        content: list[dict[str, Any]] = [{"type": "thinking", "thinking": str(d.get("text") or ""), "signature": d["signature"]}
                                         for d in signed]  # fmt: skip
        if not signed and turn.get("reasoning_content"):  # reasoning no one signed (every backend but Anthropic)
            content.append({"type": "thinking", "thinking": turn["reasoning_content"], "signature": ""})
        content += [{"type": "redacted_thinking", "data": d["data"]} for d in redacted]
        if text := record.text():
            content.append({"type": "text", "text": text})
        content += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"], "input": tool_use_input(c["function"]["arguments"])}
                    for c in turn.get("tool_calls") or ()]  # fmt: skip
        stop_reason = STOP_REASONS.get(str(record.finish_reason), "end_turn")
        return {**self.head(record), "content": content, "stop_reason": stop_reason}


# --- serving ---------------------------------------------------------------------------


def message_record(key_name: str | None, call: MessagesCall) -> StreamRecord:
    """A record read as Anthropic's stream; `openai_api.answer` bounds what it holds."""
    stream_id = secrets.token_urlsafe(16)
    return StreamRecord(stream_id, key_name, call.request, sys.maxsize, MessageFramer(call, stream_id), "v1/messages")


async def messages(services: Services, exchange: Exchange) -> None:
    """Answer one authenticated Messages request; refusals raise Refusal."""
    call = parse_messages_request(exchange.body, services.config)
    exchange = exchange.parsed()  # this frame lives as long as the stream: the raw body and header dict are let go
    record = message_record(exchange.key_name, call)
    framer = cast(MessageFramer, record.framer)
    await answer(services, exchange, record, call.stream, framer.message_object, failure_object)


async def count_tokens(services: Services, exchange: Exchange) -> None:
    """The prompt's size in tokens, estimated as the ledger estimates it (~4
    characters a token, tools included) and marked so: no backend is asked."""
    request = parse_messages_request(exchange.body, services.config, counting=True).request
    size = prompt_chars(request.messages) + (len(dumps(request.tools)) if request.tools else 0)
    tokens = estimated_usage(size, 0)["prompt_tokens"]
    await send_json(services, exchange, 200, {"input_tokens": tokens, "estimated": True})
