"""Anthropic Messages streaming (PROVIDERS.md 5): typed SSE events, of which
only `text_delta`s are answer text; thinking, signatures, tool input and
pings are read and dropped. The stream is complete at `message_stop`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import httpx

from . import (
    ChatRequest,
    Chunk,
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
from .lines import ReadToEOF, SSEDecoder

DEFAULT_MODEL = "claude-sonnet-4-20250514"
VERSION = "2023-06-01"
FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}  # fmt: skip
HANDLED = frozenset({"message_start", "content_block_delta", "message_delta", "message_stop", "error"})


def build_request(upstream: Upstream, request: ChatRequest) -> tuple[str, dict[str, Any], dict[str, str]]:
    system, turns = split_system(request.messages)
    body: dict[str, Any] = {"model": request.model, "max_tokens": request.max_tokens, "messages": turns, "stream": True}
    if system:
        body["system"] = system
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop_sequences"] = request.stop
    headers = {"x-api-key": upstream.api_key, "anthropic-version": VERSION,
               "content-type": "application/json", "accept": "text/event-stream"}
    return upstream.base_url.rstrip("/") + "/v1/messages", body, headers


def prompt_tokens(usage: Any) -> int | None:
    """Input tokens, cache reads and writes included (as OpenAI counts them)."""
    counts = [field_of(usage, k) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")]
    return sum(c for c in counts if isinstance(c, int)) if isinstance(counts[0], int) else None


async def stream_anthropic(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
    decoder = SSEDecoder()
    prompt: int | None = None
    stop_reason: str | None = None
    usage: dict[str, Any] | None = None  # only once message_delta brought the final counts
    final: Chunk | None = None  # read on to EOF once it is known
    async with open_stream(http, *build_request(upstream, request)) as response:
        async for events in ReadToEOF(body_pieces(response), decoder.feed, decoder.finish):
            for event in events:
                if event.event not in HANDLED or final:
                    continue  # ping, block starts and stops, event types added later (R5); the rest is read to EOF
                data = json_object(event.data, f"a {event.event} event")
                if event.event == "content_block_delta":
                    text = field_of(data, "delta", "text")
                    if field_of(data, "delta", "type") == "text_delta" and isinstance(text, str) and text:
                        yield text
                elif event.event == "message_start":
                    prompt = prompt_tokens(field_of(data, "message", "usage"))
                elif event.event == "message_delta":
                    stop_reason = field_of(data, "delta", "stop_reason") or stop_reason
                    counts = data.get("usage")  # cumulative; newer APIs repeat the input counts here
                    usage = make_usage(prompt_tokens(counts) or prompt, field_of(counts, "output_tokens"))
                elif event.event == "message_stop":
                    if not isinstance(stop_reason, str):
                        raise UpstreamError("protocol_error", "the upstream sent message_stop without a stop_reason", usage=usage)
                    final = final_for(stop_reason, FINISH_REASONS, usage)
                else:  # error
                    failure = UpstreamError.reported(field_of(data, "error", "message"), field_of(data, "error", "type"), usage=usage)
                    failure.retryable = failure.upstream_type == "overloaded_error"  # before any text: worth another attempt
                    raise failure
    if final is None:
        raise UpstreamError("protocol_error", "the upstream stream ended before message_stop", usage=usage)
    yield final
