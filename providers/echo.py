"""The `echo` backend: streams the last user message back, word by word, so
a fresh checkout with no provider key streams something at once."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator

import anyio
import httpx

from . import ChatRequest, Chunk, Final, Upstream, make_usage

DEFAULT_MODEL = "echo"
WORD = re.compile(r"\s*\S+\s*|\s+")  # leading space rides on the first word


def echo_tokens(text: str) -> list[str]:
    """Word-sized tokens whose concatenation is exactly `text`."""
    return WORD.findall(text)


def before_stop(text: str, stop: list[str]) -> str:
    """`text` up to the first stop sequence in it, as a model stops there."""
    return text[: min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))]


async def stream_echo(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
    del http  # local: no upstream at all
    delay = upstream.token_delay
    users = [m["content"] for m in request.messages if m["role"] == "user"]
    tokens = echo_tokens(before_stop(users[-1], request.stop or [])) if users else []
    prompt = sum(len(echo_tokens(m["content"])) for m in request.messages)
    for token in tokens[: request.max_tokens]:
        if delay:
            await anyio.sleep(delay)
        else:
            await anyio.lowlevel.checkpoint()  # stay cancellable on long messages
        yield token
    sent = min(len(tokens), request.max_tokens)
    reason = "length" if len(tokens) > request.max_tokens else "stop"
    yield Final(reason, make_usage(prompt, sent))
