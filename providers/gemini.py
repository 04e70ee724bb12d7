"""Google Gemini `streamGenerateContent?alt=sse` (PROVIDERS.md 7): SSE `data:`
lines with CRLF, no end marker (EOF after the chunk with `finishReason`), and
errors after the 200 sent as raw JSON spread over lines outside SSE framing.

Beyond text (DESIGN.md "Beyond text"), in Gemini's own wire form:
- user parts: `text`, and images as `inlineData` from base64 `data:` URLs. An
  `https` image URL is refused (naming the part): Gemini's `fileData` needs a
  MIME type the URL does not give, and only some models fetch external URLs.
- assistant turns: role `model`, a `text` part and one `functionCall` part per
  call (`args` the parsed arguments), each carrying back, on that same part,
  the `thoughtSignature` it came with (`extra_content.google.thought_signature`,
  the same string). A gemini-3 turn whose calls carry no signature at all (it
  came from another backend) gets Google's documented placeholder on its first
  call, so a loop can move onto Gemini 3. Reasoning text and other providers'
  `reasoning_details` are never sent (Gemini reads only its signatures).
- `tool` messages: `functionResponse` parts in a user turn, the name looked up
  from the history by `tool_call_id`; a JSON object result is the response as
  is, any other text `{"result": text}`.
- `tools` as `functionDeclarations` with `parametersJsonSchema` (OpenAI tools
  are JSON Schema; the older `parameters` field refuses `additionalProperties`,
  `$schema`, `const`...); `tool_choice` as `functionCallingConfig` mode AUTO,
  NONE or ANY (+ `allowedFunctionNames`); `parallel_tool_calls: false`, which
  Gemini has no switch for, keeps the first call of a turn only.
- `reasoning_effort` as `thinkingConfig` with `includeThoughts: true`: a
  `thinkingLevel` (LOW for minimal/low, HIGH for medium/high) on gemini-3 and
  later, a `thinkingBudget` elsewhere (a token budget by effort, at most half
  of `max_tokens`, which counts thoughts too; `none` is budget 0 where the model
  allows it). Models that do not think (gemini-1.x, 2.0) refuse an effort.
- `response_format` as `responseMimeType: application/json` (+
  `responseJsonSchema` for `json_schema`).

Streamed back: `thought: true` parts are Reasoning; each `functionCall` part is
one whole ToolCallDelta (Gemini sends whole calls and no ids: `call_` + random),
its `thoughtSignature` kept in the Final's RoundTrip as the call's
`extra_content`. A signature on a text part is not kept: Gemini validates
signatures on function calls only (text ones are "recommended", and our
joined text has no part boundaries to put it back on), and keeping it would
give every plain Gemini 3 answer a `message` event.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import replace
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
    arguments_json,
    body_pieces,
    field_of,
    final_for,
    json_object,
    make_usage,
    new_call_id,
    open_stream,
    text_of,
)
from .lines import LineSplitter, ReadToEOF

DEFAULT_MODEL = "gemini-2.0-flash"
MODEL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,255}"  # it goes into the URL path: nothing that could change the URL
MAX_RAW = 64 * 1024  # an error object outside SSE longer than this is not one
BLOCKED = "promptFeedback.blockReason"  # the prompt itself was refused
FINISH_REASONS = {
    "STOP": "stop", "MAX_TOKENS": "length", BLOCKED: "content_filter",
    **dict.fromkeys("SAFETY RECITATION BLOCKLIST PROHIBITED_CONTENT SPII IMAGE_SAFETY LANGUAGE".split(), "content_filter"),
    **dict.fromkeys("OTHER FINISH_REASON_UNSPECIFIED MALFORMED_FUNCTION_CALL UNEXPECTED_TOOL_CALL TOO_MANY_TOOL_CALLS".split(),
                    "error"),
}  # fmt: skip
LEVELS = {"minimal": "LOW", "low": "LOW", "medium": "HIGH", "high": "HIGH"}  # Gemini 3 Pro takes LOW and HIGH only
BUDGETS = {"minimal": 512, "low": 1024, "medium": 8192, "high": 24576}  # within every 2.5 model's range
# For histories not made by Gemini (https://ai.google.dev/gemini-api/docs/thought-signatures).
PLACEHOLDER_SIGNATURE = "skip_thought_signature_validator"
TOOL_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,(.*)", re.DOTALL)
VERSION = re.compile(r"gemini-(\d+)(?:\.(\d+))?")


def thinking_of(model: str) -> str:
    """How a model takes reasoning: `level` (gemini-3 on), `budget` (2.5, and names
    we cannot read, such as gemini-flash-latest: gemini-3 takes a budget too) or `none`."""
    version = VERSION.match(model)
    if version is None:
        return "budget"
    major, minor = int(version[1]), int(version[2] or 0)
    return "level" if major >= 3 else "budget" if (major, minor) >= (2, 5) else "none"


def thinking_config(request: ChatRequest) -> dict[str, Any] | None:
    effort, model = request.reasoning_effort, request.model
    if effort is None:
        return None
    kind = thinking_of(model)
    if kind == "none":
        if effort == "none":
            return None
        raise Unsupported("reasoning_effort", f"reasoning_effort: the gemini model {model} does not think")
    if effort == "none":
        if kind == "level" or ("pro" in model and "flash" not in model):
            raise Unsupported("reasoning_effort", f"reasoning_effort none: the gemini model {model} cannot turn thinking off")
        return {"thinkingBudget": 0}
    if kind == "level":
        return {"includeThoughts": True, "thinkingLevel": LEVELS[effort]}
    least = 512 if "flash-lite" in model else 128 if "pro" in model else 1
    budget = min(BUDGETS[effort], request.max_tokens // 2)  # max_tokens counts the thoughts too: half of it at most
    if budget < least:
        message = (
            f"reasoning_effort: max_tokens {request.max_tokens} leaves no room for the least thinking budget"
            f" of the gemini model {model} ({least}; half of max_tokens at most)"
        )
        raise Unsupported("reasoning_effort", message)
    return {"includeThoughts": True, "thinkingBudget": budget}


def user_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content if isinstance(content, list) else []):
        if part.get("type") == "text":
            parts.append({"text": part["text"]})
            continue
        url = part["image_url"]["url"]
        if (data := DATA_URL.fullmatch(url)) is None:
            what = (
                "an https image URL (Gemini's fileData needs an uploaded file; send the image as a base64 data: URL)"
                if url.startswith("https:")
                else "a data: URL that is not base64"
            )
            raise Unsupported(f"{where}.content[{j}]", f"{where}.content[{j}] is {what}: not supported by the gemini backend")
        parts.append({"inlineData": {"mimeType": data[1], "data": data[2]}})
    return parts


def model_parts(message: dict[str, Any], level: bool, where: str) -> list[dict[str, Any]]:
    text = text_of(message.get("content"))
    parts: list[dict[str, Any]] = [{"text": text}] if text or not message.get("tool_calls") else []
    calls = message.get("tool_calls") or []
    signatures = [field_of(call, "extra_content", "google", "thought_signature") for call in calls]
    for k, (call, signature) in enumerate(zip(calls, signatures, strict=True)):
        try:
            args = orjson.loads(call["function"]["arguments"] or "{}")
        except orjson.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            at = f"{where}.tool_calls[{k}].function.arguments"
            raise Unsupported(at, f"{at} is not a JSON object, which the gemini backend needs (functionCall.args)")
        part: dict[str, Any] = {"functionCall": {"name": call["function"]["name"], "args": args}}
        if isinstance(signature, str) and signature:
            part["thoughtSignature"] = signature
        elif k == 0 and level and not any(isinstance(s, str) and s for s in signatures):
            part["thoughtSignature"] = PLACEHOLDER_SIGNATURE
        parts.append(part)
    return parts


def tool_response(message: dict[str, Any], names: dict[str, str], where: str) -> dict[str, Any]:
    call_id = message["tool_call_id"]
    if call_id not in names:
        refusal = f"{where}.tool_call_id {call_id!r} names no tool call of an earlier assistant turn (the gemini backend needs its name)"
        raise Unsupported(f"{where}.tool_call_id", refusal)
    content = message.get("content")
    if isinstance(content, list) and any(p.get("type") != "text" for p in content):
        raise Unsupported(f"{where}.content", f"{where}.content: the gemini backend takes text tool results only")
    text = text_of(content)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    return {"functionResponse": {"name": names[call_id], "response": value if isinstance(value, dict) else {"result": text}}}


def add_turn(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    """A turn, merged into the last one when it has the same role; two plain text
    parts meeting there are joined with a blank line (as text turns always were)."""
    if not contents or contents[-1]["role"] != role:
        contents.append({"role": role, "parts": parts})
        return
    last = contents[-1]["parts"]
    if parts and last and last[-1].keys() == {"text"} and parts[0].keys() == {"text"}:
        last[-1] = {"text": last[-1]["text"] + "\n\n" + parts[0]["text"]}
        parts = parts[1:]
    last.extend(parts)


def translate(request: ChatRequest) -> dict[str, Any]:
    """The request body; Unsupported for what Gemini cannot be given."""
    level = thinking_of(request.model) == "level"
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> its call's name, from the history
    for i, message in enumerate(request.messages):
        role, where = message["role"], f"messages[{i}]"
        if role == "system":
            system.append(text_of(message.get("content")))
        elif role == "user":
            add_turn(contents, "user", user_parts(message.get("content"), where))
        elif role == "assistant":
            names.update((call["id"], call["function"]["name"]) for call in message.get("tool_calls") or ())
            add_turn(contents, "model", model_parts(message, level, where))
        else:
            add_turn(contents, "user", [tool_response(message, names, where)])
    config: dict[str, Any] = {"maxOutputTokens": request.max_tokens}
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.top_p is not None:
        config["topP"] = request.top_p
    if request.stop:
        config["stopSequences"] = request.stop
    if (thinking := thinking_config(request)) is not None:
        config["thinkingConfig"] = thinking
    if request.response_format is not None:
        config["responseMimeType"] = "application/json"
        schema = field_of(request.response_format, "json_schema", "schema")
        if request.response_format["type"] == "json_schema" and schema:
            config["responseJsonSchema"] = schema
    body: dict[str, Any] = {"contents": contents, "generationConfig": config}
    if request.tools:
        declarations = []
        for tool in request.tools:
            function = tool["function"]
            declaration = {"name": function["name"]}
            if function.get("description"):
                declaration["description"] = function["description"]
            if function.get("parameters"):
                declaration["parametersJsonSchema"] = function["parameters"]
            declarations.append(declaration)
        body["tools"] = [{"functionDeclarations": declarations}]
    if request.tool_choice is not None and (request.tools or request.tool_choice == "none"):
        choice = request.tool_choice
        calling: dict[str, Any] = {"mode": TOOL_MODES.get(choice, "ANY") if isinstance(choice, str) else "ANY"}
        if isinstance(choice, dict):
            calling["allowedFunctionNames"] = [choice["function"]["name"]]
        body["toolConfig"] = {"functionCallingConfig": calling}
    if prompt := "\n\n".join(system):
        body["systemInstruction"] = {"parts": [{"text": prompt}]}
    return body


def check(request: ChatRequest) -> None:
    """Refuses, naming the field, what Gemini cannot be given (before any upstream call)."""
    translate(request)


def build_request(upstream: Upstream, request: ChatRequest) -> tuple[str, dict[str, Any], dict[str, str]]:
    url = f"{upstream.base_url.rstrip('/')}/v1beta/models/{request.model}:streamGenerateContent?alt=sse"
    return url, translate(request), {"x-goog-api-key": upstream.api_key, "content-type": "application/json",
                                     "accept": "text/event-stream"}  # fmt: skip


class ChunkReader:
    """State of one Gemini stream: the finish reason, the last usage snapshot, the calls."""

    def __init__(self, one_call: bool = False) -> None:
        self.reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.calls = 0  # functionCall parts so far: STOP then means tool_calls
        self.one_call = one_call  # parallel_tool_calls false: the calls after the first are not passed on
        self.call_extras: dict[int, dict[str, Any]] = {}  # index -> extra_content (the call's thoughtSignature)

    def tokens(self, chunk: dict[str, Any]) -> list[Chunk]:
        """The chunk's pieces in part order: answer text, Reasoning, ToolCallDelta."""
        if isinstance(error := chunk.get("error"), dict):
            raise UpstreamError.reported(error.get("message"), error.get("status"), error.get("code"), self.usage)
        if isinstance(meta := chunk.get("usageMetadata"), dict):  # a snapshot on every chunk: the last one wins
            thoughts = meta.get("thoughtsTokenCount")
            output = sum(n for n in (meta.get("candidatesTokenCount"), thoughts) if isinstance(n, int))
            self.usage = make_usage(meta.get("promptTokenCount"), output, meta.get("totalTokenCount"),
                                    reasoning_tokens=thoughts if isinstance(thoughts, int) else None)  # fmt: skip
        if field_of(chunk, "promptFeedback", "blockReason"):
            self.reason = BLOCKED
        candidates = chunk.get("candidates")
        candidate = candidates[0] if isinstance(candidates, list) and candidates else None
        if isinstance(reason := field_of(candidate, "finishReason"), str):
            self.reason = reason
        parts = field_of(candidate, "content", "parts")
        pieces: list[Chunk] = []
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            if isinstance(call := part.get("functionCall"), dict):
                if self.calls and self.one_call:
                    continue
                index, self.calls = self.calls, self.calls + 1
                name, args = call.get("name"), call.get("args")
                arguments = arguments_json(args if isinstance(args, dict) else {})
                pieces.append(ToolCallDelta(index, new_call_id(), name if isinstance(name, str) else "", arguments))
                if isinstance(signature := part.get("thoughtSignature"), str) and signature:
                    self.call_extras[index] = {"google": {"thought_signature": signature}}
            elif isinstance(text := part.get("text"), str) and text:
                pieces.append(Reasoning(text) if part.get("thought") is True else text)
        return pieces

    def final(self) -> Final:
        if self.reason is None:
            raise UpstreamError("protocol_error", "the upstream stream ended before a finishReason", usage=self.usage)
        final = (
            Final("tool_calls", self.usage) if self.reason == "STOP" and self.calls else final_for(self.reason, FINISH_REASONS, self.usage)
        )
        return replace(final, round_trip=RoundTrip(call_extras=self.call_extras)) if self.call_extras else final


async def stream_gemini(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
    splitter, reader = LineSplitter(), ChunkReader(request.parallel_tool_calls is False)
    data: list[bytes] = []  # the `data:` lines of the event being read
    raw = b""  # lines outside SSE that began with `{`: an error object spread over lines (python-genai reads them too)
    async with open_stream(http, *build_request(upstream, request)) as response:
        # at EOF, a blank line ends an unterminated last event
        async for lines in ReadToEOF(body_pieces(response), splitter.feed, lambda: [*splitter.finish(), b""]):
            for line in lines:
                if line.startswith(b"data:"):
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
                elif not line and data:  # a blank line ends the event
                    for piece in reader.tokens(json_object(b"\n".join(data), "an event")):
                        yield piece
                    data = []
                elif raw or line.lstrip().startswith(b"{"):
                    raw += line + b"\n"
                    if len(raw) > MAX_RAW:
                        raise UpstreamError("protocol_error", "the upstream sent too much text outside SSE events")
                    try:
                        value = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        continue  # not complete yet
                    raw = b""
                    for piece in reader.tokens(value if isinstance(value, dict) else {}):
                        yield piece
    yield reader.final()
