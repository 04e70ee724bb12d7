"""The `/chat/stream` request and its strict validation: a POSTed object, a
bare array of messages, or a GET with `prompt` (or `messages`) in the query,
into one ChatRequest. Every refusal names the field."""

from __future__ import annotations

from typing import Any

import orjson

from asgi_stream_core import chat_shape
from asgi_stream_core.config import Config, check_request
from asgi_stream_core.types import invalid, shown
from providers import ChatRequest

ROLES = ("system", "user", "assistant")  # a text conversation's; tool results and developer too:
ALL_ROLES = {**{role: role for role in ROLES}, "tool": "tool", "developer": "system"}


def parse_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty array of {role, content} objects")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ALL_ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(ALL_ROLES)}, got {shown(role)}")
        if isinstance(content, str) and role in ROLES and len(message) == 2:  # plain text: as it always was
            messages.append({"role": role, "content": content})
        elif content is None or isinstance(content, str | list):
            messages.append(chat_shape.message_of(message, f"messages[{i}]", ALL_ROLES[role]))
        else:
            raise invalid(f"messages[{i}].content must be a string (or an array of parts), got {shown(content)}")
    return messages


def loads(data: bytes | str, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"{what} is not valid JSON: {exc}") from None


def field(fields: dict[str, Any], query: dict[str, str], name: str, kind: type) -> Any:
    """A body field of exactly `kind`, else the query parameter (a string)."""
    if name in fields and fields[name] is not None:
        value = fields[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not kind:
            wanted = {int: "an integer", float: "a number", str: "a string"}[kind]
            raise invalid(f"{name} must be {wanted}, got {shown(value)}")
        return value
    if name not in query:
        return None
    raw = query[name]
    if kind is int:
        if not raw.isascii() or not raw.isdigit():
            raise invalid(f"{name} must be an integer, got {raw[:40]!r}")
        if len(raw) > 20:  # past every limit here, and int() refuses past 4,300 digits
            raise invalid(f"{name} is out of range, got {shown(raw)}")
        return int(raw)
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise invalid(f"{name} must be a number, got {raw[:40]!r}") from None
    return raw


def request_messages(method: str, query: dict[str, str], body: bytes) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The messages, and the body's other fields (none for a GET or a bare array)."""
    if method == "GET":
        if "prompt" in query and "messages" in query:
            raise invalid("give prompt or messages, not both")
        if "prompt" in query:
            return [{"role": "user", "content": query["prompt"]}], {}
        if "messages" in query:
            return parse_messages(loads(query["messages"], "messages")), {}
        raise invalid("prompt (or messages, a JSON array) is required")
    data = loads(body, "the request body")
    if isinstance(data, dict):
        if "messages" not in data:
            raise invalid("messages is required")
        return parse_messages(data["messages"]), data
    if isinstance(data, list):
        return parse_messages(data), {}  # the article's form: a bare array
    raise invalid("the body must be a JSON object or an array of messages")


def parse_chat_request(method: str, query: dict[str, str], body: bytes, config: Config) -> ChatRequest:
    """Validate a start-stream request (any of the three forms) strictly."""
    messages, fields = request_messages(method, query, body)
    backend, model = chosen_backend(field(fields, query, "backend", str), field(fields, query, "model", str), config)
    max_tokens = field(fields, query, "max_tokens", int)
    if max_tokens is None:
        max_tokens = config.max_tokens
    if not 1 <= max_tokens <= config.max_tokens_limit:
        raise invalid(f"max_tokens must be from 1 to {config.max_tokens_limit}, got {shown(max_tokens)}")
    temperature = field(fields, query, "temperature", float)
    if temperature is not None and not 0 <= temperature <= 2:
        raise invalid(f"temperature must be from 0 to 2, got {temperature}")
    effort = chat_shape.effort_of(field(fields, query, "reasoning_effort", str))
    tools = chat_shape.tools_of(fields.get("tools"))
    return check_request(ChatRequest(messages, backend, model, max_tokens, temperature, None, None, tools,
                       chat_shape.tool_choice_of(fields.get("tool_choice"), tools),
                       chat_shape.flag_of(fields.get("parallel_tool_calls"), "parallel_tool_calls"), effort,
                       chat_shape.response_format_of(fields.get("response_format"))), config)  # fmt: skip


def chosen_backend(backend: str | None, model: str | None, config: Config) -> tuple[str, str]:
    """The backend and model asked for: an alias (a `model`, with no `backend`) is its own
    backend and model (config.routing); else the backend (DEFAULT_BACKEND when none) and its model."""
    if model is not None and model in config.routing.aliases:
        if backend is not None:
            raise invalid(f"model {shown(model)} is an alias, which chooses its backends: give no backend")
        return model, model
    backend = config.default_backend if backend is None else backend
    if backend not in config.backend_names:
        raise invalid(f"backend must be one of {', '.join(config.backend_names)}, got {shown(backend)}")
    spec = config.backend(backend)
    if backend not in config.upstreams:
        raise invalid(f"backend {backend!r} is not configured here ({spec.setting} is not set)")
    model = config.model_for(backend) if model is None else model
    if not spec.model_pattern.fullmatch(model):
        raise invalid(f"model {shown(model)} is not a valid model name for {backend}")
    return backend, model
