"""OpenAI's Responses API as a front door (`POST /v1/responses`): the input
items become the same ChatRequest (chat_shape checks the messages, the
backend's check refuses what it cannot honour), the gateway's own generation
and writer run it, and ResponseFramer reads the record's events as the typed
event sequence the Responses API defines, or as one Response object. A
stored response's items are kept (stores/responses.py) so that the next
request can continue it by `previous_response_id` or by `item_reference`s.
Refusals and errors are in OpenAI's shape (openai_api.error_body)."""

from __future__ import annotations

import base64
import binascii
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any, cast

import orjson

from asgi_stream_core import chat_shape
from asgi_stream_core.config import Config, check_request
from asgi_stream_core.openai_api import (
    CompletionFramer,
    answer,
    dumps,
    failure_object,
    flag,
    json_object_body,
    number,
    route_model,
    served_model,
    upstream_error_fields,
)
from asgi_stream_core.record import StreamRecord
from asgi_stream_core.services import Services
from asgi_stream_core.stores.responses import Items, ResponseItems
from asgi_stream_core.types import invalid, shown, unsupported
from asgi_stream_core.web import Exchange
from providers import ChatRequest

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
ITEM_PREFIXES = {"message": "msg", "reasoning": "rs", "function_call": "fc"}
ROUND_TRIP = "asgi-stream:"  # an encrypted_content of ours: the turn's signed reasoning (reasoning_details), base64 JSON
ENDINGS = {"stop": "completed", "tool_calls": "completed", "length": "incomplete", "content_filter": "incomplete"}
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


# --- the request: items to a ChatRequest ------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseCall:
    """A validated Responses request."""

    request: ChatRequest
    model: str  # "<backend>/<model>": the name the answer carries
    stream: bool
    store: bool
    items: Items  # the conversation as items (a previous response's, then this input resolved): what is kept
    echoed: dict[str, Any]  # the request's settings, as the Response object repeats them


async def parse_response_request(body: bytes, config: Config, state: ResponseItems, key_name: str | None) -> ResponseCall:
    """Validate a Responses body strictly, resolve its references to stored
    items of this key, and refuse, naming it, whatever the gateway cannot
    carry. Fields it does not know are ignored, as on /v1/chat/completions."""
    fields = json_object_body(body)
    refuse_unsupported(fields)
    backend, model = route_model(fields.get("model"), config)
    items = await resolved(input_items(fields.get("input")), fields.get("previous_response_id"), state, key_name)
    instructions = fields.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid(f"instructions must be a string, got {shown(instructions)}", "instructions")
    max_tokens = fields.get("max_output_tokens")
    if max_tokens is None:
        max_tokens = config.max_tokens
    elif type(max_tokens) is not int or not 1 <= max_tokens <= config.max_tokens_limit:
        limit = config.max_tokens_limit
        raise invalid(f"max_output_tokens must be an integer from 1 to {limit}, got {shown(max_tokens)}", "max_output_tokens")
    tools = chat_shape.tools_of(chat_tools(fields.get("tools")))
    effort = reasoning_effort(fields.get("reasoning"))
    text_format = fields.get("text", {}).get("format") if isinstance(fields.get("text"), dict) else None
    request = ChatRequest(chat_messages(instructions, items), backend, model, max_tokens, number(fields, "temperature", 2.0),
                          number(fields, "top_p", 1.0), None, tools, chat_tool_choice(fields.get("tool_choice"), tools),
                          chat_shape.flag_of(fields.get("parallel_tool_calls"), "parallel_tool_calls"), effort,
                          chat_shape.response_format_of(chat_response_format(text_format)))  # fmt: skip
    store = chat_shape.flag_of(fields.get("store"), "store") is not False  # OpenAI's default: stored
    echoed = {"instructions": instructions, "max_output_tokens": max_tokens, "temperature": request.temperature,
              "top_p": request.top_p, "tools": fields.get("tools") or [], "tool_choice": fields.get("tool_choice") or "auto",
              "parallel_tool_calls": request.parallel_tool_calls is not False, "reasoning": {"effort": effort, "summary": None},
              "text": {"format": text_format or {"type": "text"}}, "store": store,
              "previous_response_id": fields.get("previous_response_id"), "metadata": fields.get("metadata") or {}}  # fmt: skip
    return ResponseCall(check_request(request, config), config.model_name(backend, model), flag(fields, "stream"), store, items, echoed)


def refuse_unsupported(fields: dict[str, Any]) -> None:
    """What only OpenAI's own service keeps or runs: conversations, prompt
    templates, background runs, log probabilities."""
    for name, why in (("background", "responses run while the client waits"), ("conversation", "use previous_response_id"),
                      ("prompt", "prompt templates live on OpenAI's service"),
                      ("top_logprobs", "not every backend could honour it")):  # fmt: skip
        if fields.get(name) not in (None, False, 0):
            raise unsupported(f"{name} is not supported: {why}", name)


def input_items(value: Any) -> Items:
    """`input` as items of one shape each (references not yet resolved): a string is one user message."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list) or not value:
        raise invalid(f"input must be a string or a non-empty array of items, got {shown(value)}", "input")
    return [input_item(item, f"input[{i}]") for i, item in enumerate(value)]


def input_item(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise invalid(f"{where} must be an item object, got {shown(item)}", where)
    kind = item.get("type", "message" if "role" in item else None)

    def text(name: str) -> bool:
        return isinstance(item.get(name), str)

    if kind == "message":
        return message_item(item, where)
    if kind == "function_call" and text("call_id") and text("name") and item["name"] and text("arguments"):
        call = {"type": kind, "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
        return call | {k: item[k] for k in ("id", "extra_content") if isinstance(item.get(k), str | dict)}
    if kind == "function_call_output" and text("call_id"):
        return {"type": kind, "call_id": item["call_id"], "output": output_text(item.get("output"), f"{where}.output")}
    if kind == "reasoning":
        texts = [p.get("text") for p in (item.get("summary") or []) + (item.get("content") or []) if isinstance(p, dict)]
        if not all(isinstance(t, str) for t in texts) or not (item.get("encrypted_content") is None or text("encrypted_content")):
            raise invalid(f"{where}: a reasoning item has summary/content parts with text, and encrypted_content a string", where)
        kept = {"type": kind, "summary": [{"type": "summary_text", "text": t} for t in texts]}
        return kept | {k: item[k] for k in ("id", "encrypted_content") if text(k)}
    if kind == "item_reference" and text("id"):
        return {"type": kind, "id": item["id"]}
    if kind in ("message", "function_call", "function_call_output", "item_reference"):
        raise invalid(f"{where}: a {kind} item is missing a field or has one of the wrong type: {shown(item)}", where)
    accepted = "message, function_call, function_call_output, reasoning and item_reference"
    raise unsupported(f"{where} is a {shown(kind)} item: accepted are {accepted}", where)


def message_item(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role must be one of {', '.join(ROLES)}, got {shown(role)}", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        content = [{"type": "output_text" if role == "assistant" else "input_text", "text": content}]
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or an array of parts, got {shown(content)}", f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        at, kind = f"{where}.content[{j}]", part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append({"type": kind, "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "output_text", "text": part["refusal"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": kind, "image_url": part["image_url"]})  # chat_shape checks the URL
        elif kind == "input_image":
            raise unsupported(f"{at}: an image is a data: or https URL in image_url (no file ids: files live on OpenAI's service)", at)
        else:
            raise unsupported(f"{at} is {shown(part)}: parts are input_text, input_image or output_text", at)
    return {"type": "message", "role": role, "content": parts} | ({"id": item["id"]} if isinstance(item.get("id"), str) else {})


def output_text(value: Any, where: str) -> str:
    """A tool's output: a string, or text parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise invalid(f"{where} must be a string or an array of text parts, got {shown(value)}", where)


async def resolved(items: Items, previous_id: Any, state: ResponseItems, key_name: str | None) -> Items:
    """The conversation: the previous response's input and output items, then
    this input with each item_reference replaced by the stored item it names."""
    fetched: dict[str, tuple[Items, Items] | None] = {}  # a response's items are looked up once per request

    async def stored(response_id: str) -> tuple[Items, Items] | None:
        if response_id not in fetched:
            fetched[response_id] = await state.find(response_id, key_name)
        return fetched[response_id]

    conversation: Items = []
    if previous_id is not None:
        previous = await stored(previous_id) if isinstance(previous_id, str) else None
        if previous is None:
            why = "no response with that id is stored for this key (unknown, expired, another key's, or made with store: false)"
            raise invalid(f"previous_response_id {shown(previous_id)}: {why}", "previous_response_id")
        conversation += previous[0] + previous[1]
    for i, item in enumerate(items):
        if item["type"] != "item_reference":
            conversation.append(item)
            continue
        kept = await stored(response_of_item(item["id"]))
        found = next((it for it in (kept[1] + kept[0] if kept else []) if it.get("id") == item["id"]), None)
        if found is None:
            why = "no item with that id is stored for this key (unknown, expired, another key's, or made with store: false)"
            raise invalid(f"input[{i}]: item_reference {shown(item['id'])}: {why}", f"input[{i}]")
        conversation.append(found)
    return conversation


def item_id(kind: str, response_hex: str, output_index: int) -> str:
    """An output item's id names its response, so a reference finds it with one lookup."""
    return f"{ITEM_PREFIXES[kind]}_{response_hex}_{output_index}"


def response_of_item(item_id: str) -> str:
    return "resp_" + item_id.partition("_")[2].rpartition("_")[0]


def chat_messages(instructions: str | None, items: Items) -> list[dict[str, Any]]:
    """The conversation in the chat shape providers take: consecutive
    assistant-side items (reasoning, assistant text, function calls) are one
    assistant turn; a function call's output is a tool message."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    turn: AssistantTurn | None = None
    for i, item in enumerate(items):
        where, kind = f"input[{i}]", item["type"]
        if kind == "function_call_output" or (kind == "message" and item["role"] != "assistant"):
            if turn is not None:
                messages.append(turn.message())
                turn = None
            role = "tool" if kind != "message" else ROLES[item["role"]]
            message = {"role": role, "tool_call_id": item["call_id"], "content": item["output"]} if role == "tool" \
                else {"role": role, "content": chat_parts(item["content"])}  # fmt: skip
            messages.append(chat_shape.message_of(message, where, role))
            continue
        turn = turn or AssistantTurn(where)
        turn.add(item)
    return messages if turn is None else [*messages, turn.message()]


class AssistantTurn:
    """One assistant message gathered from the items of one turn."""

    def __init__(self, where: str):
        self.where = where  # its first item, named in a refusal
        self.parts: Items = []
        self.calls: Items = []
        self.reasoning: list[str] = []
        self.details: Items = []

    def add(self, item: dict[str, Any]) -> None:
        if item["type"] == "message":
            self.parts += chat_parts(item["content"])
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            self.calls.append(call | ({"extra_content": item["extra_content"]} if "extra_content" in item else {}))
        else:  # reasoning
            self.reasoning += [part["text"] for part in item["summary"]]
            self.details += reasoning_details(item.get("encrypted_content"))

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.parts or (None if self.calls else "")}
        if self.calls:
            message["tool_calls"] = self.calls
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.details:
            message["reasoning_details"] = self.details
        return chat_shape.message_of(message, self.where, "assistant")


def chat_parts(parts: Items) -> Items:
    return [{"type": "image_url", "image_url": {"url": p["image_url"]}} if p["type"] == "input_image"
            else {"type": "text", "text": p["text"]} for p in parts]  # fmt: skip


def reasoning_details(encrypted: Any) -> Items:
    """Our own encrypted_content carries a turn's signed reasoning back; any
    other (OpenAI's) means nothing to a chat backend and is left out."""
    if not isinstance(encrypted, str) or not encrypted.startswith(ROUND_TRIP):
        return []
    try:
        details = orjson.loads(base64.b64decode(encrypted[len(ROUND_TRIP) :], validate=True))
    except (binascii.Error, orjson.JSONDecodeError):
        return []
    return details if isinstance(details, list) and all(isinstance(d, dict) for d in details) else []


def chat_tools(value: Any) -> Any:
    """Responses function tools {type, name, description, parameters, strict} in the chat shape."""
    if not isinstance(value, list):
        return value
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            why = "only function tools are supported (hosted tools run on OpenAI's service)"
            raise unsupported(f"tools[{i}] is a {shown(kind)} tool: {why}", f"tools[{i}]")
    fields = ("name", "description", "parameters", "strict")
    return [{"type": "function", "function": {k: tool[k] for k in fields if tool.get(k) is not None}} for tool in value]


def chat_tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> Any:
    """`auto`, `none`, `required`, or {type: function, name} in the chat shape."""
    if isinstance(value, dict) and value.get("type") == "function":
        value = {"type": "function", "function": {"name": value.get("name")}}
    return chat_shape.tool_choice_of(value, tools)


def reasoning_effort(value: Any) -> str | None:
    effort = value.get("effort") if isinstance(value, dict) else None
    if (value is not None and not isinstance(value, dict)) or (effort is not None and effort not in chat_shape.EFFORTS):
        raise invalid(f"reasoning must be {{effort: {' | '.join(chat_shape.EFFORTS)}}}, got {shown(value)}", "reasoning")
    return cast(str | None, effort)


def chat_response_format(value: Any) -> Any:
    """text.format's json_schema {name, schema, strict} in the chat shape's response_format."""
    if isinstance(value, dict) and value.get("type") == "json_schema":
        spec = {k: value[k] for k in ("name", "schema", "strict", "description") if k in value}
        return {"type": "json_schema", "json_schema": spec}
    return value


# --- the answer: the output items, the event sequence, the Response object --------------


class ResponseOutput:
    """The output items the record's events make, in order of their first
    event (reasoning, the message, each function call), and the stream events
    each step makes (without sequence numbers). Item ids follow from the
    response and the item's place, so they are the same whoever builds them."""

    def __init__(self, response_hex: str):
        self.response_hex = response_hex
        self.items: Items = []
        self.position = 0  # the record's events up to here are in the items
        self.places: dict[str, int] = {}  # "message", "reasoning", or a call's index -> its output index
        self.done = False  # the record's `done` is in: every item is whole

    def add(self, name: bytes, data: str) -> Items:
        if name == b"token":
            index, opened = self.item("message", "message", {"role": "assistant", "content": []})
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            if opened:
                self.items[index]["content"].append(part)
                opened.append(self.event("content_part.added", index, content_index=0, part=dict(part)))
            self.items[index]["content"][0]["text"] += data
            return [*opened, self.event("output_text.delta", index, content_index=0, delta=data, logprobs=[])]
        if name == b"reasoning":
            index, opened = self.item("reasoning", "reasoning", {"summary": []})
            if opened:
                part = {"type": "summary_text", "text": ""}
                self.items[index]["summary"].append(part)
                opened.append(self.event("reasoning_summary_part.added", index, summary_index=0, part=dict(part)))
            self.items[index]["summary"][0]["text"] += data
            return [*opened, self.event("reasoning_summary_text.delta", index, summary_index=0, delta=data)]
        if name == b"tool_call":
            piece = orjson.loads(data)
            place = f"call {piece['index']}"
            index, opened = self.item(place, "function_call", {"call_id": piece.get("id"), "name": piece.get("name"), "arguments": ""})
            self.items[index]["arguments"] += piece["arguments"]
            delta = [self.event("function_call_arguments.delta", index, delta=piece["arguments"])] if piece["arguments"] else []
            return [*opened, *delta]
        if name == b"message":
            return self.round_trip(orjson.loads(data))
        self.done = self.done or name == b"done"
        return []

    def item(self, place: str, kind: str, fields: dict[str, Any]) -> tuple[int, Items]:
        """The output index of the item at `place`, and the event that adds it if it is new."""
        if place in self.places:
            return self.places[place], []
        index = self.places[place] = len(self.items)
        self.items.append({"id": item_id(kind, self.response_hex, index), "type": kind, **fields, "status": "in_progress"})
        return index, [{"type": "response.output_item.added", "output_index": index, "item": orjson.loads(orjson.dumps(self.items[index]))}]

    def event(self, kind: str, index: int, **fields: Any) -> dict[str, Any]:
        return {"type": f"response.{kind}", "item_id": self.items[index]["id"], "output_index": index, **fields}

    def round_trip(self, message: dict[str, Any]) -> Items:
        """What only the turn's message knows: signed reasoning (into the
        reasoning item's encrypted_content) and a call's signature (its extra_content)."""
        events: Items = []
        if details := message.get("reasoning_details"):
            index, events = self.item("reasoning", "reasoning", {"summary": []})
            self.items[index]["encrypted_content"] = ROUND_TRIP + base64.b64encode(orjson.dumps(details)).decode()
        for k, call in enumerate(message.get("tool_calls") or ()):
            if "extra_content" in call and f"call {k}" in self.places:
                self.items[self.places[f"call {k}"]]["extra_content"] = call["extra_content"]
        return events

    def close(self, status: str) -> Items:
        """Each item's closing events, in output order, once every event is in."""
        events: Items = []
        for index, item in enumerate(self.items):
            item["status"] = status
            if item["type"] == "message":
                part = item["content"][0]
                events += [self.event("output_text.done", index, content_index=0, text=part["text"], logprobs=[]),
                           self.event("content_part.done", index, content_index=0, part=part)]  # fmt: skip
            elif item["type"] == "reasoning" and item["summary"]:
                part = item["summary"][0]
                events += [self.event("reasoning_summary_text.done", index, summary_index=0, text=part["text"]),
                           self.event("reasoning_summary_part.done", index, summary_index=0, part=part)]  # fmt: skip
            elif item["type"] == "function_call":
                events.append(self.event("function_call_arguments.done", index, name=item["name"], arguments=item["arguments"]))
            events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        return events

    def catch_up(self, record: StreamRecord) -> Items:
        """The events of what the record holds past what is in the items already."""
        events: Items = []
        for name, _, data in record.log.entries(self.position) or ():
            self.position += 1
            events += self.add(name, CompletionFramer.decode(data))
        return events


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    counts = {name: int((usage or {}).get(name) or 0) for name in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"input_tokens": counts["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": counts["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": int((usage or {}).get("reasoning_tokens") or 0)},
            "total_tokens": counts["total_tokens"]}  # fmt: skip


class ResponseFramer:
    """A response's events read as the Responses API's typed events, each an
    `event:` and a `data:` line with its `sequence_number`: created and
    in_progress first, each output item's added / deltas / done, then
    `response.completed`, `response.incomplete` (a `length` ending) or
    `response.failed`. One reader only (no ids: no resume on this route), so
    it frames each event once, from where it stopped."""

    resumable = False  # a store holds its slot only: no id to resume or cancel it by
    encode = staticmethod(CompletionFramer.encode)
    decode = staticmethod(CompletionFramer.decode)

    def __init__(self, call: ResponseCall, stream_hex: str):
        self.call, self.response_hex = call, stream_hex
        self.id = f"resp_{stream_hex}"
        self.created_at = int(time.time())
        self.output = ResponseOutput(stream_hex)  # what this reader has framed
        self.sequence = 0
        self.ended = False  # the closing events are out

    def frame(self, record: StreamRecord, position: int) -> bytes:
        events = self.output.catch_up(record)
        if self.output.done and not self.ended:
            self.ended = True
            events += self.ending(record, self.output)
        return b"".join(map(self.framed, events))

    def framed(self, event: dict[str, Any]) -> bytes:
        event["sequence_number"], self.sequence = self.sequence, self.sequence + 1
        return b"event: " + str(event["type"]).encode() + b"\ndata: " + dumps(event) + b"\n\n"

    def opening(self, record: StreamRecord) -> bytes:
        started = self.response_object(record, [], "in_progress")
        return b"".join(self.framed({"type": f"response.{kind}", "response": started}) for kind in ("created", "in_progress"))

    def ending(self, record: StreamRecord, output: ResponseOutput) -> Items:
        status = "failed" if record.error is not None else ENDINGS.get(record.finish_reason or "", "incomplete")
        events = output.close("completed" if status == "completed" else "incomplete")
        return [*events, {"type": f"response.{status}", "response": self.response_object(record, output.items, status)}]

    def output_items(self, record: StreamRecord) -> Items:
        """The finished output, built afresh from the whole record (the framer's own may be behind)."""
        output = ResponseOutput(self.response_hex)
        output.catch_up(record)
        return cast(Items, self.ending(record, output)[-1]["response"]["output"])

    def response_object(self, record: StreamRecord, output: Items, status: str | None = None) -> dict[str, Any]:
        if status is None:
            status = "failed" if record.error is not None else ENDINGS.get(record.finish_reason or "", "incomplete")
        error = record.error
        failed = None if error is None else {"code": str(upstream_error_fields(error)["code"]), "message": error.message}
        incomplete = {"reason": INCOMPLETE.get(record.finish_reason or "", "interrupted")} if status == "incomplete" else None
        text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
        model = served_model(record, self.call.model)  # through an alias: the target that serves, once known
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status, "model": model,
                "error": failed, "incomplete_details": incomplete, "output": output, "output_text": text,
                "usage": None if status == "in_progress" else response_usage(record.usage), "truncation": "disabled",
                **self.call.echoed}  # fmt: skip

    def whole(self, record: StreamRecord) -> dict[str, Any]:
        """The Response object, for a request that did not ask to stream."""
        return self.response_object(record, self.output_items(record))


# --- serving ---------------------------------------------------------------------------


def response_record(key_name: str | None, call: ResponseCall) -> StreamRecord:
    """A record read as the Responses API's events; `openai_api.answer` bounds what
    it holds (the whole answer, which the stored items need: cut `length` past the bound)."""
    stream_hex = secrets.token_hex(16)
    return StreamRecord(stream_hex, key_name, call.request, sys.maxsize, ResponseFramer(call, stream_hex), "v1/responses")


async def create_response(services: Services, exchange: Exchange) -> None:
    """Answer one authenticated request; refusals raise Refusal."""
    state = services.responses
    call = await parse_response_request(exchange.body, services.config, state, exchange.key_name)
    exchange = exchange.parsed()  # this frame lives as long as the stream: the raw body and header dict are let go
    record = response_record(exchange.key_name, call)
    framer = cast(ResponseFramer, record.framer)
    await answer(services, exchange, record, call.stream, framer.whole, failure_object, lambda: keep(state, record, framer))


async def keep(state: ResponseItems, record: StreamRecord, framer: ResponseFramer) -> None:
    """Store a finished response's items (unless `store: false`, or it failed)."""
    if framer.call.store and record.error is None and record.finish_reason != "cancelled":
        await state.keep(framer.id, record.key_name, framer.call.items, framer.output_items(record))


