"""OpenAI's Chat Completions as a second front door (`/v1/chat/completions`,
`/v1/models`): the request becomes the same ChatRequest, the gateway's own
generation and writer run it, only the framing and the error shape are OpenAI's."""

from __future__ import annotations

import json
import math
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import anyio
import orjson

from asgi_stream_core import chat_shape
from asgi_stream_core.config import Config, check_request
from asgi_stream_core.generation import generation_for
from asgi_stream_core.reader import Reader
from asgi_stream_core.record import StreamRecord
from asgi_stream_core.services import Services
from asgi_stream_core.types import Headers, Message, Receive, Refusal, Send, invalid, shown, unsupported
from asgi_stream_core.web import Exchange, cors_headers, send_response
from providers import ChatRequest, UpstreamError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_STOP_SEQUENCES = 4  # OpenAI's own limit; Gemini's is 5
DONE = b"data: [DONE]\n\n"
HEADER_NAMES = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


# --- errors in OpenAI's shape ---------------------------------------------------------


def openai_error_type(status: int) -> str:
    """OpenAI's error `type` for a status (the SDKs pick their exception class by the status)."""
    named = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
    return named.get(status) or ("server_error" if status >= 500 else "invalid_request_error")


def error_body(error: Refusal) -> bytes:
    """A refusal in OpenAI's shape: our error type is its `code`, the field at fault its `param`."""
    fields = {"message": error.message, "type": openai_error_type(error.status), "param": error.param, "code": error.type}
    return orjson.dumps({"error": fields})


def upstream_status(error: UpstreamError) -> int:
    """The status a failed generation answers with before any token: the
    upstream's own (a 429 stays a 429), except that its refusal of the gateway's
    provider key is our fault, not the client's: 502 like other upstream failures."""
    if error.status is not None and 400 <= error.status <= 599 and error.status not in (401, 403, 407):
        return error.status
    return {"timeout": 504, "shutdown": 503}.get(error.type, 502)


def upstream_error_fields(error: UpstreamError) -> dict[str, Any]:
    code = error.code if error.code is not None else error.type
    return {"message": error.message, "type": openai_error_type(upstream_status(error)), "param": None, "code": code}


def retry_after(error: UpstreamError) -> list[tuple[bytes, bytes]]:
    return [] if error.retry_after is None else [(b"retry-after", str(math.ceil(error.retry_after)).encode())]


# --- CORS -------------------------------------------------------------------------------


def allowed_headers(headers: Mapping[str, str]) -> bytes:
    """A browser preflight's answer: the SDKs send headers of their own
    (`x-stainless-*`, `openai-organization`, ...) whose list changes between
    versions, so allow those the browser asks for, if it asks for header names."""
    asked = headers.get("access-control-request-headers", "").strip()
    return (asked if HEADER_NAMES.fullmatch(asked) else "Authorization, Content-Type").encode("latin-1")


# --- the request: OpenAI's body to a ChatRequest ----------------------------------------


@dataclass(frozen=True, slots=True)
class Completion:
    """A validated Chat Completions request."""

    request: ChatRequest
    model: str  # "<backend>/<model>": the name the answer carries
    stream: bool
    include_usage: bool


def parse_completion_request(body: bytes, config: Config) -> Completion:
    """Validate an OpenAI request body strictly; refuse, naming it, any field
    whose meaning the gateway cannot carry to every backend. Fields it does not
    know are ignored, as OpenAI-compatible servers commonly do."""
    fields = json_object_body(body)
    refuse_unsupported(fields)
    backend, model = route_model(fields.get("model"), config)
    messages = parse_messages(fields.get("messages"))
    limit_name = "max_completion_tokens" if fields.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = fields.get(limit_name)
    if max_tokens is None:
        max_tokens = config.max_tokens
    elif type(max_tokens) is not int or not 1 <= max_tokens <= config.max_tokens_limit:
        raise invalid(f"{limit_name} must be an integer from 1 to {config.max_tokens_limit}, got {shown(max_tokens)}", limit_name)
    stream = flag(fields, "stream")
    options = fields.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid(f"stream_options must be an object, got {shown(options)}", "stream_options")
    tools = chat_shape.tools_of(fields.get("tools"))
    request = ChatRequest(messages, backend, model, max_tokens, number(fields, "temperature", 2.0), number(fields, "top_p", 1.0),
                          stop_sequences(fields.get("stop")), tools, chat_shape.tool_choice_of(fields.get("tool_choice"), tools),
                          chat_shape.flag_of(fields.get("parallel_tool_calls"), "parallel_tool_calls"),
                          chat_shape.effort_of(fields.get("reasoning_effort")),
                          chat_shape.response_format_of(fields.get("response_format")))  # fmt: skip
    include_usage = stream and flag(options or {}, "include_usage")
    return Completion(check_request(request, config), config.model_name(backend, model), stream, include_usage)


def refuse_unsupported(fields: dict[str, Any]) -> None:
    why = "not every backend could honour it"
    if fields.get("functions"):  # null and [] ask for nothing
        raise unsupported("functions (the legacy shape) is not supported: use tools", "functions")
    if fields.get("function_call") not in (None, "none"):
        raise unsupported("function_call (the legacy shape) is not supported: use tool_choice", "function_call")
    n = fields.get("n")
    if n is not None and (type(n) is not int or n < 1):
        raise invalid(f"n must be a positive integer, got {shown(n)}", "n")
    if n is not None and n > 1:
        raise unsupported(f"n={n} is not supported: one choice per request", "n")
    for name in ("logprobs", "top_logprobs"):
        if fields.get(name) not in (None, False):
            raise unsupported(f"{name} is not supported: {why}", name)


def route_model(value: Any, config: Config) -> tuple[str, str]:
    """`<backend>/<model>` names its backend; an alias is its own backend and model
    (config.routing); another bare name goes to DEFAULT_BACKEND."""
    if not isinstance(value, str) or not value:
        raise invalid(f"model must be '<backend>/<model>' (see GET /v1/models) or a model name, got {shown(value)}", "model")
    if value in config.routing.aliases:
        return value, value
    prefix, slash, rest = value.partition("/")
    names = config.backend_names
    if not slash:
        backend, model = config.default_backend, value
    elif prefix in names:
        backend, model = prefix, rest
    else:
        message = f"model {shown(value)}: no backend {prefix!r} (backends: {', '.join(names)})"
        raise Refusal(404, "model_not_found", message, param="model")
    if backend not in config.upstreams:
        message = f"model {shown(value)}: backend {backend!r} is not configured here ({config.backend(backend).setting} is not set)"
        raise Refusal(404, "model_not_found", message, param="model")
    if not config.backend(backend).model_pattern.fullmatch(model):
        raise invalid(f"model {shown(model)} is not a valid model name for {backend}", "model")
    return backend, model


def parse_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty array of {role, content} objects", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object with role and content", where)
        role = message.get("role")
        if role == "function" or message.get("function_call"):
            raise unsupported(f"{where}: the legacy function-call shape is not supported; use tools", where)
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(ROLES)}, got {shown(role)}", f"{where}.role")
        if message.get("audio"):
            raise unsupported(f"{where}.audio is not supported", f"{where}.audio")
        messages.append(chat_shape.message_of(message, where, ROLES[role]))
    return messages


def flag(fields: dict[str, Any], name: str) -> bool:
    """A boolean field, false when absent."""
    return bool(chat_shape.flag_of(fields.get(name), name))


def number(fields: dict[str, Any], name: str, high: float) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
        raise invalid(f"{name} must be a number from 0 to {high:g}, got {shown(value)}", name)
    return float(value)


def stop_sequences(value: Any) -> list[str] | None:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return None
    if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stops):
        raise invalid(f"stop must be a non-empty string or up to {MAX_STOP_SEQUENCES} of them, got {shown(value)}", "stop")
    return stops or None


# --- the answer: chunks, or one completion object -------------------------------------


# Line breaks to str.splitlines() but not to SSE or JSON: written raw, they cut
# a chunk in two for clients that split decoded text (the ollama SDK does).
UNICODE_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def dumps(value: Any) -> bytes:
    """JSON in UTF-8, with the Unicode line breaks escaped (they can only be in strings)."""
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError:  # a lone surrogate (JSON escapes can carry one) is no UTF-8
        data = json.dumps(value, ensure_ascii=False).encode("utf-8", "replace")
    for raw, escaped in UNICODE_LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return data


def frame_completion_chunk(head: dict[str, Any], delta: dict[str, str], finish_reason: str | None) -> bytes:
    """One `data:` event with one choice: no `event:` name, no `id:` line, as OpenAI sends."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return b"data: " + dumps({**head, "choices": [choice]}) + b"\n\n"


def frame_usage_chunk(head: dict[str, Any], usage: dict[str, Any] | None) -> bytes:
    return b"data: " + dumps({**head, "choices": [], "usage": openai_usage(usage)}) + b"\n\n"


def frame_error_chunk(error: UpstreamError) -> bytes:
    """A failure after the stream started: the SDKs raise it as an APIError."""
    return b"data: " + dumps({"error": upstream_error_fields(error)}) + b"\n\n"


def openai_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    """The three counts OpenAI sends (ours may add `estimated` and the like),
    and the reasoning tokens among the completion's when the provider said."""
    names = ("prompt_tokens", "completion_tokens", "total_tokens")
    counts: dict[str, Any] = {name: int((usage or {}).get(name) or 0) for name in names}
    if isinstance(reasoning := (usage or {}).get("reasoning_tokens"), int):
        counts["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return counts


class CompletionFramer:
    """A completion's events read as Chat Completions chunks: a token is a
    content delta; `done` is the finish chunk, usage if asked and [DONE], or,
    after an error, the error chunk alone. Only the request's own client ever
    reads it (no ids: no resume on this route)."""

    resumable = False  # a store holds its slot only: no id to resume or cancel it by

    def __init__(self, completion: Completion, stream_id: str):
        self.completion = completion
        self.head = {"id": f"chatcmpl-{stream_id}", "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": completion.model}  # fmt: skip

    @staticmethod
    def encode(data: str) -> bytes:
        return data.encode("utf-8", "surrogatepass")  # decoded back as is: a lone surrogate stays one until written

    @staticmethod
    def decode(encoded: bytes | bytearray) -> str:
        return encoded.decode("utf-8", "surrogatepass")

    def frame(self, record: StreamRecord, position: int) -> bytes | None:
        entries = record.log.entries(position)
        if entries is None:  # dropped past the bound before this client read them: it is let go (openai_api.answer)
            return None
        frames = []
        for name, _, data in entries:
            if name == b"token":
                frames.append(frame_completion_chunk(self.head, {"content": self.decode(data)}, None))
            elif name == b"done":
                frames.append(self.ending(record))
            elif delta := self.delta(name, data):
                frames.append(frame_completion_chunk(self.head, delta, None))
        return b"".join(frames)

    def delta(self, name: bytes, data: bytes | bytearray) -> dict[str, Any] | None:
        """Reasoning as `reasoning_content`; a tool call's pieces as `tool_calls`;
        the turn's message adds what only it knows: signed reasoning as
        `reasoning_details`, a call's signature as its `extra_content`."""
        if name == b"reasoning":
            return {"reasoning_content": self.decode(data)}
        if name == b"tool_call":
            piece = orjson.loads(data)
            if "id" not in piece:
                return {"tool_calls": [{"index": piece["index"], "function": {"arguments": piece["arguments"]}}]}
            function = {"name": piece["name"], "arguments": piece["arguments"]}
            return {"tool_calls": [{"index": piece["index"], "id": piece["id"], "type": "function", "function": function}]}
        if name == b"message":
            message = orjson.loads(data)
            delta: dict[str, Any] = {}
            if message.get("reasoning_details"):
                delta["reasoning_details"] = message["reasoning_details"]
            extras = [{"index": i, "extra_content": c["extra_content"]}
                      for i, c in enumerate(message.get("tool_calls") or ()) if "extra_content" in c]  # fmt: skip
            if extras:
                delta["tool_calls"] = extras
            return delta or None
        return None

    def opening(self, record: StreamRecord) -> bytes:
        """Written once the first output is in (`respond` holds the status until then), so
        that through an alias the chunks name the target that serves."""
        self.head["model"] = served_model(record, self.completion.model)
        return frame_completion_chunk(self.head, {"role": "assistant", "content": ""}, None)

    def ending(self, record: StreamRecord) -> bytes:
        """An error ends the response at once; otherwise the finish reason, usage if asked, [DONE]."""
        if record.error is not None:
            return frame_error_chunk(record.error)
        usage = frame_usage_chunk(self.head, record.usage) if self.completion.include_usage else b""
        return frame_completion_chunk(self.head, {}, record.finish_reason) + usage + DONE

    def completion_object(self, record: StreamRecord) -> dict[str, Any]:
        """The whole answer, for a request that did not ask to stream."""
        message: dict[str, Any] = {"role": "assistant", "content": record.text(), "refusal": None}
        turn = next((orjson.loads(data) for name, _, data in record.log.entries(0) or () if name == b"message"), None)
        if turn is not None:  # reasoning, tool calls and what carries them back
            message.update({k: v for k, v in turn.items() if k != "role"})
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": record.finish_reason}
        head = {**self.head, "model": served_model(record, self.completion.model)}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": openai_usage(record.usage)}


def served_model(record: StreamRecord, asked: str) -> str:
    """The model as a response names it: through an alias, the `<upstream>/<model>` that served."""
    return f"{record.served[0]}/{record.served[1]}" if record.served else asked


def models_list(config: Config) -> dict[str, Any]:
    """One model per configured backend: its default one, as `<backend>/<model>`; then each alias by its name."""
    models = [{"id": f"{name}/{config.model_for(name)}", "object": "model", "created": 0, "owned_by": name}
              for name in config.backend_names if name in config.upstreams]  # fmt: skip
    aliases = [{"id": name, "object": "model", "created": 0, "owned_by": "asgi-stream"} for name in config.routing.aliases]
    return {"object": "list", "data": models + aliases}


# --- serving ---------------------------------------------------------------------------


async def list_models(services: Services, exchange: Exchange) -> None:
    await send_json(services, exchange, 200, models_list(services.config))


def completion_record(key_name: str | None, completion: Completion) -> StreamRecord:
    """A record read as Chat Completions; `answer` bounds what it holds."""
    stream_id = secrets.token_urlsafe(16)
    framer = CompletionFramer(completion, stream_id)
    return StreamRecord(stream_id, key_name, completion.request, sys.maxsize, framer, "v1/chat/completions")


async def chat_completions(services: Services, exchange: Exchange) -> None:
    """Answer one authenticated request; refusals raise Refusal."""
    completion = parse_completion_request(exchange.body, services.config)
    exchange = exchange.parsed()  # this frame lives as long as the stream: the raw body and header dict are let go
    record = completion_record(exchange.key_name, completion)
    framer = cast(CompletionFramer, record.framer)
    await answer(services, exchange, record, completion.stream, framer.completion_object, failure_object)


def failure_object(error: UpstreamError) -> dict[str, Any]:
    return {"error": upstream_error_fields(error)}


async def answer(services: Services, exchange: Exchange, record: StreamRecord, streaming: bool,
                 whole: Callable[[StreamRecord], Any], failure: Callable[[UpstreamError], Any],
                 before_ending: Callable[[], Awaitable[None]] | None = None) -> None:  # fmt: skip
    """Run the record's generation and answer its one client, as every front door
    without resume does: only the whole answer of a request that did not ask to
    stream (`whole`) and a failure before any output (`failure`) are the protocol's own.
    `before_ending` runs before the client can read the ending (the Responses API
    stores a response's items then, so the client's next request finds them).
    The record holds at most STREAM_BUFFER_BYTES: for a streaming client the oldest
    events are dropped past it (and a client that fell behind them is let go, as on
    /chat/stream); a whole answer (not streamed, or whose items are stored) is cut
    there instead, ending `length`."""
    record.bound(services.config.stream_buffer_bytes, whole=not streaming or before_ending is not None)
    await services.admission.hold(record)
    generation = generation_for(services, record)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(generation.run)
        await respond(services, record, exchange, streaming, whole, failure, before_ending)
        record.cancel("client gone")  # no resume on these routes: once the client is gone, so is the generation


async def respond(services: Services, record: StreamRecord, exchange: Exchange, streaming: bool,
                  whole: Callable[[StreamRecord], Any], failure: Callable[[UpstreamError], Any],
                  before_ending: Callable[[], Awaitable[None]] | None = None) -> None:  # fmt: skip
    """The status waits for the first output (or the end): a failure before it
    answers with the upstream's status, so the SDKs raise their usual exception."""
    if streaming:
        cors = cors_headers(services.config, exchange.scope)
        send = exchange.send if before_ending is None else waiting_before_the_end(exchange.send, record, before_ending)
        streamed = await Reader(services, record, 0).serve(exchange.receive, send, record.opening, cors, lambda: streams(record))
        if streamed or record.ever_disconnected:  # else it failed before any output: answered below with its status
            return
    elif not await until(lambda: record.finished, record, exchange.receive):
        return
    error = record.error
    try:
        with anyio.move_on_after(services.config.send_timeout):  # a client that takes no bytes is let go
            if error is not None:
                await send_json(services, exchange, upstream_status(error), failure(error), retry_after(error))
            else:
                if before_ending is not None:
                    await before_ending()
                await send_json(services, exchange, 200, whole(record))
    except OSError:  # ASGI 2.4 servers raise it on a send to a gone client
        record.ever_disconnected = True


def streams(record: StreamRecord) -> bool | None:
    """None until the first output or the end; then whether the answer is the
    stream (else it failed before any output, and is answered with its status)."""
    if record.tokens:
        return True
    return record.error is None if record.finished else None


def waiting_before_the_end(send: Send, record: StreamRecord, before_ending: Callable[[], Awaitable[None]]) -> Send:
    """`send`, but the first body sent once the record is finished (it may hold
    the ending) waits for `before_ending`."""
    done = False

    async def send_after(message: Message) -> None:
        nonlocal done
        if not done and record.finished and message["type"] == "http.response.body":
            done = True
            await before_ending()
        await send(message)

    return send_after


def json_object_body(body: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object (every front door's first check)."""
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", None) from None
    if not isinstance(fields, dict):
        raise invalid("the request body must be a JSON object", None)
    return fields


async def until(ready: Callable[[], bool], record: StreamRecord, receive: Receive) -> bool:
    """Wait until `ready()` (it turns true as the generation appends or ends)
    while watching the client; False if the client left first."""
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(cancel_on_disconnect, receive, record, tasks.cancel_scope)
        while not ready():
            await record.wait()
        tasks.cancel_scope.cancel()
    return not record.ever_disconnected


async def cancel_on_disconnect(receive: Receive, record: StreamRecord, scope: anyio.CancelScope) -> None:
    await receive()  # the body was read whole: all that can come now is http.disconnect
    record.ever_disconnected = True
    scope.cancel()


async def send_json(services: Services, exchange: Exchange, status: int, payload: Any, headers: Headers | None = None) -> None:
    cors = cors_headers(services.config, exchange.scope)
    await send_response(exchange.send, status, dumps(payload), b"application/json", [*(headers or []), *cors])
