"""The `echo` backend: streams the last user message back, word by word, so
a fresh checkout with no provider key streams something at once. It plays
the whole contract without a key (docs/design.md, "Beyond text"): with a
`reasoning_effort` other than `none` it reasons first; with `tools` and a
user message last it calls a tool (the one `tool_choice` names, else the
first) with `{"text": <the message>}` and ends `tool_calls`; with a tool
result last it answers with that result's text."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator

import anyio
import httpx
import orjson

from . import ChatRequest, Chunk, Final, Reasoning, ToolCallDelta, Upstream, make_usage, text_of

DEFAULT_MODEL = "echo"
WORD = re.compile(r"\s*\S+\s*|\s+")  # leading space rides on the first word


def echo_tokens(text: str) -> list[str]:
    """Word-sized tokens whose concatenation is exactly `text`."""
    return WORD.findall(text)


def before_stop(text: str, stop: list[str]) -> str:
    """`text` up to the first stop sequence in it, as a model stops there."""
    return text[: min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))]


def check(request: ChatRequest) -> None:
    """Echo honours every field (it plays them), so it refuses nothing."""


def tool_to_call(request: ChatRequest) -> str | None:
    """The tool echo calls: with tools, a user message last and a choice other than none."""
    last = request.messages[-1]
    if not request.tools or last["role"] != "user" or request.tool_choice == "none":
        return None
    named = request.tool_choice.get("function", {}).get("name") if isinstance(request.tool_choice, dict) else None
    return str(named or request.tools[0]["function"]["name"])


async def stream_echo(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
    del http  # local: no upstream at all
    delay = upstream.token_delay
    last = request.messages[-1]
    users = [text_of(m.get("content")) for m in request.messages if m["role"] == "user"]
    answer = text_of(last.get("content")) if last["role"] == "tool" else (users[-1] if users else "")
    tokens = echo_tokens(before_stop(answer, request.stop or []))
    prompt = sum(len(echo_tokens(text_of(m.get("content")))) for m in request.messages)
    pieces: list[Chunk] = []
    if request.reasoning_effort not in (None, "none"):
        pieces += [Reasoning(word) for word in echo_tokens(f"The user said {len(tokens)} words; I answer in kind.")]
    if (tool := tool_to_call(request)) is not None:
        arguments = orjson.dumps({"text": users[-1]}).decode()
        pieces += [ToolCallDelta(0, "call_echo0", tool, arguments[:8]), ToolCallDelta(0, arguments=arguments[8:])]
        tokens = []
    for piece in [*pieces, *tokens[: request.max_tokens]]:
        if delay:
            await anyio.sleep(delay)
        else:
            await anyio.lowlevel.checkpoint()  # stay cancellable on long messages
        yield piece
    sent = min(len(tokens), request.max_tokens)
    reason = "tool_calls" if tool is not None else "length" if len(tokens) > request.max_tokens else "stop"
    thought = sum(isinstance(piece, Reasoning) for piece in pieces)
    yield Final(reason, make_usage(prompt, sent + len(pieces), reasoning_tokens=thought or None))
