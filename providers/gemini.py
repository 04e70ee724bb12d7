"""Google Gemini `streamGenerateContent?alt=sse` (PROVIDERS.md 7): SSE `data:`
lines with CRLF, no end marker (EOF after the chunk with `finishReason`), and
errors after the 200 sent as raw JSON spread over lines outside SSE framing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import httpx
import orjson

from . import (
    ChatRequest,
    Final,
    Upstream,
    UpstreamError,
    body_pieces,
    field_of,
    final_for,
    json_object,
    make_usage,
    open_stream,
    split_system,
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


def build_request(upstream: Upstream, request: ChatRequest) -> tuple[str, dict[str, Any], dict[str, str]]:
    system, turns = split_system(request.messages)
    config: dict[str, Any] = {"maxOutputTokens": request.max_tokens}
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.top_p is not None:
        config["topP"] = request.top_p
    if request.stop:
        config["stopSequences"] = request.stop
    contents = [{"role": "model" if t["role"] == "assistant" else "user", "parts": [{"text": t["content"]}]} for t in turns]
    body: dict[str, Any] = {"contents": contents, "generationConfig": config}
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    url = f"{upstream.base_url.rstrip('/')}/v1beta/models/{request.model}:streamGenerateContent?alt=sse"
    return url, body, {"x-goog-api-key": upstream.api_key, "content-type": "application/json", "accept": "text/event-stream"}


class ChunkReader:
    """State of one Gemini stream: the finish reason, the last usage snapshot."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.calls = False  # a functionCall part: STOP then means tool_calls

    def tokens(self, chunk: dict[str, Any]) -> list[str]:
        if isinstance(error := chunk.get("error"), dict):
            raise UpstreamError.reported(error.get("message"), error.get("status"), error.get("code"), self.usage)
        if isinstance(meta := chunk.get("usageMetadata"), dict):  # a snapshot on every chunk: the last one wins
            output = sum(n for n in (meta.get("candidatesTokenCount"), meta.get("thoughtsTokenCount")) if isinstance(n, int))
            self.usage = make_usage(meta.get("promptTokenCount"), output, meta.get("totalTokenCount"))
        if field_of(chunk, "promptFeedback", "blockReason"):
            self.reason = BLOCKED
        candidates = chunk.get("candidates")
        candidate = candidates[0] if isinstance(candidates, list) and candidates else None
        if isinstance(reason := field_of(candidate, "finishReason"), str):
            self.reason = reason
        parts = field_of(candidate, "content", "parts")
        parts = parts if isinstance(parts, list) else []
        self.calls = self.calls or any(field_of(part, "functionCall") is not None for part in parts)
        # thought parts are reasoning, not answer text
        return [t for part in parts if isinstance(t := field_of(part, "text"), str) and t and not field_of(part, "thought")]

    def final(self) -> Final:
        if self.reason is None:
            raise UpstreamError("protocol_error", "the upstream stream ended before a finishReason", usage=self.usage)
        if self.reason == "STOP" and self.calls:
            return Final("tool_calls", self.usage)
        return final_for(self.reason, FINISH_REASONS, self.usage)


async def stream_gemini(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[str | Final, None]:
    splitter, reader = LineSplitter(), ChunkReader()
    data: list[bytes] = []  # the `data:` lines of the event being read
    raw = b""  # lines outside SSE that began with `{`: an error object spread over lines (python-genai reads them too)
    async with open_stream(http, *build_request(upstream, request)) as response:
        # at EOF, a blank line ends an unterminated last event
        async for lines in ReadToEOF(body_pieces(response), splitter.feed, lambda: [*splitter.finish(), b""]):
            for line in lines:
                if line.startswith(b"data:"):
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
                elif not line and data:  # a blank line ends the event
                    for text in reader.tokens(json_object(b"\n".join(data), "an event")):
                        yield text
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
                    for text in reader.tokens(value if isinstance(value, dict) else {}):
                        yield text
    yield reader.final()
