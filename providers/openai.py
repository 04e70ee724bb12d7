"""OpenAI Chat Completions streaming, and every server that copies it:
vLLM, llama.cpp, LM Studio, OpenRouter, Groq, Together (PROVIDERS.md 3-4).

Tolerances: comments, role-only and empty deltas, reasoning deltas (never
text), usage on any chunk (last wins), no `[DONE]`, in-band errors.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import httpx
import orjson

from . import ChatRequest, Chunk, Final, Upstream, UpstreamError, body_pieces, final_for, make_usage, open_stream, protocol_error
from .lines import ReadToEOF, SSEDecoder

DEFAULT_MODEL = "gpt-4o-mini"

FINISH_REASONS = {
    "stop": "stop", "length": "length", "content_filter": "content_filter",
    "tool_calls": "tool_calls", "function_call": "tool_calls",
    # compatible servers (PROVIDERS.md 4): end-of-sequence spellings are stops
    "eos": "stop", "eos_token": "stop", "end": "stop", "repetition": "stop",
    "abort": "error", "error": "error",
}  # fmt: skip


def build_request(upstream: Upstream, request: ChatRequest) -> tuple[str, dict[str, Any], dict[str, str]]:
    url = upstream.base_url.rstrip("/") + "/chat/completions"
    # api.openai.com wants max_completion_tokens (o-series refuse max_tokens);
    # compatible servers may only know max_tokens.
    limit_field = "max_completion_tokens" if "//api.openai.com" in url else "max_tokens"
    body: dict[str, Any] = {"model": request.model, "messages": request.messages, "stream": True,
                            "stream_options": {"include_usage": True}, limit_field: request.max_tokens}
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = request.stop
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    if upstream.api_key:
        headers["authorization"] = f"Bearer {upstream.api_key}"
    return url, body, headers


class ChunkReader:
    """State of one OpenAI-style stream: finish reason, last usage, [DONE]."""

    __slots__ = ("done", "finish_reason", "usage")

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False

    def token(self, data: bytes) -> str | None:
        """The text of one `data:` payload, after noting what else it says."""
        if self.done:  # anything after [DONE] is read (to free the connection) and ignored
            return None
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            stripped = data.strip()
            self.done = stripped.startswith(b"[DONE]")
            if self.done or not stripped:  # the end marker, or an empty keep-alive frame
                return None
            raise protocol_error("the upstream sent a data line that is not JSON") from None
        if not isinstance(chunk, dict):
            raise protocol_error("the upstream sent a JSON value that is not a chunk object")
        if chunk.get("error") or chunk.get("object") == "error":
            raise in_band_error(chunk)
        usage = chunk.get("usage") or (chunk.get("x_groq") or {}).get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list):
            return None
        choice = choices[0]
        if not isinstance(choice, dict):
            raise protocol_error("the upstream sent a choice that is not an object")
        if reason := choice.get("finish_reason"):
            self.finish_reason = str(reason)
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        return content if isinstance(content, str) and content else None

    def final(self, error_field: bytes | None) -> Final:
        if self.finish_reason is None:
            if error_field is not None:  # llama.cpp's `error:` field, JSON or plain text
                try:
                    error = orjson.loads(error_field)
                except orjson.JSONDecodeError:
                    error = error_field.decode("utf-8", "replace")
                raise in_band_error({"error": error})
            raise protocol_error("the upstream stream ended without a finish reason")
        u = self.usage
        usage = None if u is None else make_usage(u.get("prompt_tokens"), u.get("completion_tokens"), u.get("total_tokens"))
        if FINISH_REASONS.get(self.finish_reason) == "error":
            usage = None  # the error of an aborted stream has always gone without usage; kept so
        return final_for(self.finish_reason, FINISH_REASONS, usage)


def in_band_error(chunk: dict[str, Any]) -> UpstreamError:
    """`{"error": {...}}` (OpenAI, vLLM, llama.cpp) or `{"object": "error", ...}` (old vLLM)."""
    error = chunk.get("error")
    if not isinstance(error, dict):
        error = chunk if chunk.get("object") == "error" else {"message": error}
    return UpstreamError.reported(error.get("message"), error.get("type"), error.get("code"))


async def stream_openai(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
    decoder, reader = SSEDecoder(), ChunkReader()
    async with open_stream(http, *build_request(upstream, request)) as response:
        async for events in ReadToEOF(body_pieces(response), decoder.feed, lambda: decoder.finish(lenient=True)):
            for event in events:
                if (token := reader.token(event.data)) is not None:
                    yield token
    yield reader.final(decoder.error_field)
