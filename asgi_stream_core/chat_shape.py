"""OpenAI's chat shape beyond text, validated once for both front doors:
message content as parts (text, images), assistant tool calls and the
reasoning a turn carries back, tool results, and the request's `tools`,
`tool_choice`, `parallel_tool_calls`, `reasoning_effort` and
`response_format`. Every refusal names the field (OpenAI's `param`).
What a given backend can honour is the provider's to refuse
(`providers.Unsupported`), before any upstream call."""

from __future__ import annotations

from typing import Any

from asgi_stream_core.types import invalid, shown

EFFORTS = ("none", "minimal", "low", "medium", "high")
FORMATS = ("text", "json_object", "json_schema")
MAX_TOOLS = 128  # OpenAI's own limit


def text_parts(content: list[Any], where: str) -> str | list[dict[str, Any]]:
    """Content parts: text parts alone are joined with newlines (as vLLM joins
    them, and as this gateway always has); with an image they stay parts."""
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(text := part.get("text"), str):
                raise invalid(f"{at}.text must be a string, got {shown(part.get('text'))}", f"{at}.text")
            parts.append({"type": "text", "text": text})
        elif kind == "image_url":
            url = part["image_url"].get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str) or not url.startswith(("data:image/", "https://")):
                raise invalid(f"{at}.image_url.url must be a data:image/... or an https URL, got {shown(url)}", f"{at}.image_url")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            what = f"a {shown(kind)} part" if kind else shown(part)
            raise invalid(f"{at} is {what}: parts are text or image_url", at)
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def content_of(message: dict[str, Any], where: str, optional: bool) -> str | list[dict[str, Any]] | None:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return text_parts(content, where)
    if content is None and optional:
        return None
    raise invalid(f"{where}.content must be a string or an array of parts, got {shown(content)}", f"{where}.content")


def tool_calls_of(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant turn's calls, each {id, type, function: {name, arguments}}
    (a Gemini signature rides along in `extra_content`)."""
    if not isinstance(value, list) or not value:
        raise invalid(f"{where} must be a non-empty array of tool calls, got {shown(value)}", where)
    calls = []
    for k, call in enumerate(value):
        at = f"{where}[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("id"), str) or not isinstance(function, dict):
            raise invalid(f"{at} must be {{id, type: function, function: {{name, arguments}}}}, got {shown(call)}", at)
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name or not isinstance(arguments, str):
            raise invalid(f"{at}.function needs a name and its arguments as a JSON string, got {shown(function)}", f"{at}.function")
        checked: dict[str, Any] = {"id": call["id"], "type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("extra_content"), dict):
            checked["extra_content"] = call["extra_content"]
        calls.append(checked)
    return calls


def message_of(message: Any, where: str, role: str) -> dict[str, Any]:
    """One message whose role is known good, in the shape providers receive."""
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise invalid(f"{where}.tool_call_id must name the call this result answers, got {shown(call_id)}", f"{where}.tool_call_id")
        return {"role": "tool", "tool_call_id": call_id, "content": content_of(message, where, optional=False)}
    calls = message.get("tool_calls") if role == "assistant" else None
    checked: dict[str, Any] = {"role": role, "content": content_of(message, where, optional=bool(calls))}
    if calls:
        checked["tool_calls"] = tool_calls_of(calls, f"{where}.tool_calls")
    if role == "assistant":
        if isinstance(reasoning := message.get("reasoning_content"), str) and reasoning:
            checked["reasoning_content"] = reasoning
        details = message.get("reasoning_details")
        if isinstance(details, list) and all(isinstance(d, dict) for d in details) and details:
            checked["reasoning_details"] = details
    return checked


def tools_of(value: Any) -> list[dict[str, Any]] | None:
    """Function tools: {"type": "function", "function": {name, description?, parameters?}}."""
    if value is None or value == []:
        return None
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise invalid(f"tools must be an array of at most {MAX_TOOLS} function tools, got {shown(value)}", "tools")
    tools = []
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(name, str) or not name:
            raise invalid(f"tools[{i}] must be {{type: function, function: {{name, ...}}}}, got {shown(tool)}", f"tools[{i}]")
        parameters = function.get("parameters") if isinstance(function, dict) else None
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].function.parameters must be a JSON Schema object", f"tools[{i}].function.parameters")
        tools.append({"type": "function", "function": function})
    return tools


def tool_choice_of(value: Any, tools: list[dict[str, Any]] | None) -> Any:
    if value is None:
        return None
    names = {t["function"]["name"] for t in tools or []}
    if value in ("auto", "none", "required"):
        if value == "required" and not names:
            raise invalid("tool_choice 'required' needs tools", "tool_choice")
        return value
    name = value.get("function", {}).get("name") if isinstance(value, dict) and isinstance(value.get("function"), dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or name not in names:
        raise invalid(f"tool_choice must be auto, none, required or a function of tools, got {shown(value)}", "tool_choice")
    return {"type": "function", "function": {"name": name}}


def effort_of(value: Any) -> str | None:
    if value is None:
        return None
    if value not in EFFORTS:
        raise invalid(f"reasoning_effort must be one of {', '.join(EFFORTS)}, got {shown(value)}", "reasoning_effort")
    return str(value)


def response_format_of(value: Any) -> dict[str, Any] | None:
    """None for plain text; otherwise json_object, or json_schema with its schema."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in FORMATS:
        raise invalid(f"response_format must be {{type: {' | '.join(FORMATS)}}}, got {shown(value)}", "response_format")
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict) or not isinstance(spec.get("name", ""), str):
            raise invalid("response_format.json_schema must be {name, schema, strict?}", "response_format.json_schema")
        return {"type": "json_schema", "json_schema": spec}
    return {"type": "json_object"}


def flag_of(value: Any, name: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise invalid(f"{name} must be true or false, got {shown(value)}", name)
    return value
