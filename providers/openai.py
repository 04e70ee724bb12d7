"""OpenAI Chat Completions streaming, and every server that copies it:
vLLM, llama.cpp, LM Studio, OpenRouter, Groq, Together (PROVIDERS.md 3-4).

Tolerances: comments, role-only and empty deltas, usage on any chunk (last
wins), no `[DONE]`, in-band errors.

Beyond text (DESIGN.md "Beyond text"): the request goes out in the chat
shape as is (parts, tool calls, tool results, `tools`, `tool_choice`,
`parallel_tool_calls`, `reasoning_effort`, `response_format`), so `check`
refuses nothing. What a turn carries back is kept where a compatible server
wants it: `reasoning_content` (DeepSeek and Kimi refuse a continued
tool-call turn without it), `reasoning_details` entries of OpenRouter's own
shape (`reasoning.text` / `reasoning.summary` / `reasoning.encrypted`; an
entry of any other shape is no compatible server's and is dropped) and a
call's `extra_content` (Gemini's `thought_signature`). api.openai.com
produces none of them and refuses unknown message fields, so it gets none.

In the stream: `delta.reasoning_content` or `delta.reasoning` (the first
that is non-empty: a server may send both with the same text) is
`Reasoning`, never text; `delta.tool_calls` entries are `ToolCallDelta`s;
OpenRouter's `delta.reasoning_details` fragments are merged by `index`
(their `text`, `summary` and `data` joined, every other field as first
sent, a signature as last sent) into the Final's round trip, with a call's
`extra_content`; `usage.completion_tokens_details.reasoning_tokens` is the
usage's `reasoning_tokens`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
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
    Upstream,
    UpstreamError,
    body_pieces,
    final_for,
    make_usage,
    open_stream,
    protocol_error,
    upstream_text,
    writable,
)
from .lines import ReadToEOF, SSEDecoder

DEFAULT_MODEL = "gpt-4o-mini"

FINISH_REASONS = {
    "stop": "stop", "length": "length", "content_filter": "content_filter",
    "tool_calls": "tool_calls", "function_call": "tool_calls",
    # compatible servers (PROVIDERS.md 4): end-of-sequence spellings are stops
    "eos": "stop", "eos_token": "stop", "end": "stop", "repetition": "stop",
    "abort": "error", "error": "error",
}  # fmt: skip


OPENROUTER_DETAILS = frozenset({"reasoning.text", "reasoning.summary", "reasoning.encrypted"})
ROUND_TRIP_FIELDS = ("reasoning_content", "reasoning_details")
JOINED = frozenset({"text", "summary", "data"})  # the fields of a reasoning_details entry sent in fragments


def check(request: ChatRequest) -> None:
    """OpenAI-compatible servers take the chat shape as is (remote image URLs
    included: OpenAI fetches them itself), so nothing is refused here."""


def outgoing(message: dict[str, Any], openai_itself: bool) -> dict[str, Any]:
    """A message as it goes upstream: a text turn as is; an assistant turn
    without the round-trip fields the server would not know."""
    if message["role"] != "assistant" or not (message.keys() & {"reasoning_content", "reasoning_details", "tool_calls"}):
        return message
    if openai_itself:  # OpenAI's own API validates message fields and produces none of these
        message = {k: v for k, v in message.items() if k not in ROUND_TRIP_FIELDS}
        if "tool_calls" in message:
            message["tool_calls"] = [{k: v for k, v in call.items() if k != "extra_content"} for call in message["tool_calls"]]
        return message
    if details := message.get("reasoning_details"):
        kept = [d for d in details if d.get("type") in OPENROUTER_DETAILS]
        if len(kept) != len(details):
            message = {k: v for k, v in message.items() if k != "reasoning_details"}
            if kept:
                message["reasoning_details"] = kept
    return message


def build_request(upstream: Upstream, request: ChatRequest) -> tuple[str, dict[str, Any], dict[str, str]]:
    url = upstream.base_url.rstrip("/") + "/chat/completions"
    # api.openai.com wants max_completion_tokens (o-series refuse max_tokens);
    # compatible servers may only know max_tokens.
    openai_itself = "//api.openai.com" in url
    limit_field = "max_completion_tokens" if openai_itself else "max_tokens"
    messages = [outgoing(m, openai_itself) for m in request.messages]
    body: dict[str, Any] = {"model": request.model, "messages": messages, "stream": True,
                            "stream_options": {"include_usage": True}, limit_field: request.max_tokens}
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = request.stop
    if request.tools:
        body["tools"] = request.tools
    for name in ("tool_choice", "parallel_tool_calls", "reasoning_effort", "response_format"):
        if (value := getattr(request, name)) is not None:
            body[name] = value
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    if upstream.api_key:
        headers["authorization"] = f"Bearer {upstream.api_key}"
    return url, body, headers


class ChunkReader:
    """State of one OpenAI-style stream: finish reason, last usage, [DONE],
    the pieces beyond text of the last chunk, what the turn carries back."""

    __slots__ = ("details", "done", "extras", "finish_reason", "pending", "usage")

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.pending: list[Chunk] = []  # the pieces of a chunk that was more than text, in order
        self.details: dict[int, dict[str, Any]] = {}  # reasoning_details entries by index, merged
        self.extras: dict[int, dict[str, Any]] = {}  # a tool call's extra_content, by index

    def token(self, data: bytes) -> str | None:
        """The text of one `data:` payload, after noting what else it says;
        a chunk that is more than text leaves its pieces in `pending`."""
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
        usage = chunk.get("usage")
        if not usage and isinstance(groq := chunk.get("x_groq"), dict):  # Groq's own place for it; any other shape is ignored
            usage = groq.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list):
            return None
        choice = choices[0]
        if not isinstance(choice, dict):
            raise protocol_error("the upstream sent a choice that is not an object")
        if reason := choice.get("finish_reason"):
            self.finish_reason = upstream_text(reason)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return None
        content = delta.get("content")
        if content is None or len(delta) > 1:  # perhaps more than text: the per-token path is the line below
            return self.pieces(delta, content)
        return content if isinstance(content, str) and content else None

    def pieces(self, delta: dict[str, Any], content: Any) -> str | None:
        """A delta beyond text: its text returned if that is all; else its
        reasoning, text and tool call pieces, in that order, in `pending`."""
        text = content if isinstance(content, str) and content else None
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(details := delta.get("reasoning_details"), list):
            said = self.add_details(details)
            reasoning = reasoning or said  # a server that sends reasoning_details alone
        calls = delta.get("tool_calls")
        if not (isinstance(reasoning, str) and reasoning) and not (isinstance(calls, list) and calls):
            return text
        pending = self.pending
        if isinstance(reasoning, str) and reasoning:
            pending.append(Reasoning(reasoning))
        if text is not None:
            pending.append(text)
        if isinstance(calls, list):
            for position, call in enumerate(calls):
                if isinstance(call, dict):
                    pending.append(self.call_piece(call, position))
        return None

    def call_piece(self, call: dict[str, Any], position: int) -> ToolCallDelta:
        index = call.get("index", position)
        if not isinstance(index, int):
            raise protocol_error("the upstream sent a tool call whose index is not an integer")
        if isinstance(extra := call.get("extra_content"), dict) and writable(extra) is not None:  # the turn's message carries it
            self.extras[index] = extra
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        call_id, name, arguments = call.get("id"), function.get("name"), function.get("arguments")
        return ToolCallDelta(index, call_id if isinstance(call_id, str) and call_id else None,
                             name if isinstance(name, str) and name else None, arguments if isinstance(arguments, str) else "")

    def add_details(self, fragments: list[Any]) -> str:
        """Merge OpenRouter `reasoning_details` fragments by index; the reasoning text they said."""
        said = []
        for position, fragment in enumerate(fragments):
            if not isinstance(fragment, dict):
                continue
            index = fragment.get("index", position)
            entry = self.details.setdefault(index if isinstance(index, int) else position, {})
            for key, value in fragment.items():
                if value is None or (isinstance(value, dict | list) and writable(value) is None):  # the message carries it
                    continue
                if key in JOINED and isinstance(value, str):
                    joined = entry.get(key)
                    entry[key] = (joined if isinstance(joined, str) else "") + value  # a first fragment of another type is no text
                    if key != "data":
                        said.append(value)
                elif key == "signature" or key not in entry:
                    entry[key] = value
        return "".join(said)

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
        usage = None
        if u is not None:
            details = u.get("completion_tokens_details")
            thought = details.get("reasoning_tokens") if isinstance(details, dict) else None
            usage = make_usage(u.get("prompt_tokens"), u.get("completion_tokens"), u.get("total_tokens"),
                               reasoning_tokens=thought if isinstance(thought, int) and thought else None)
        if FINISH_REASONS.get(self.finish_reason) == "error":
            usage = None  # the error of an aborted stream has always gone without usage; kept so
        final = final_for(self.finish_reason, FINISH_REASONS, usage)
        if not self.details and not self.extras:
            return final
        details = [{**entry, "index": index} for index, entry in sorted(self.details.items())]
        return Final(final.finish_reason, final.usage, RoundTrip(details, dict(self.extras)))


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
                elif reader.pending:
                    for piece in reader.pending:
                        yield piece
                    reader.pending.clear()
    yield reader.final(decoder.error_field)
