"""What every backend shares: the request it is given, the chunks it yields,
the error it raises, and the one place where an upstream request is opened
(with retries before the first token).

A provider is an async generator `stream(http, upstream, request)` that
yields `str` tokens and ends with exactly one `Final`; every failure is an
`UpstreamError` raised from inside it.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Protocol

import anyio
import httpx
import orjson

FINISH_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls", "error", "cancelled"})


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated request, as every provider receives it."""

    messages: list[dict[str, str]]  # each exactly {"role", "content"}
    backend: str
    model: str
    max_tokens: int
    temperature: float | None = None


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a backend sends its requests, and with which key."""

    base_url: str
    api_key: str = ""
    token_delay: float = 0.0  # echo only: a pause before each token, for demos and tests


@dataclass(frozen=True, slots=True)
class Final:
    """The last chunk of a successful generation."""

    finish_reason: str  # already normalized to FINISH_REASONS
    usage: dict[str, Any] | None = None


# A chunk is a token (plain `str`: no allocation per token) or the Final.
Chunk = str | Final


@dataclass(slots=True)
class UpstreamError(Exception):
    """A generation that failed; becomes the client's `error` event.

    `type` is one of DESIGN.md's error types; `upstream_type` / `code` carry
    the provider's own labels when it sent any.
    """

    type: str
    message: str
    status: int | None = None
    retry_after: float | None = None
    upstream_type: str | None = None
    code: Any = None
    usage: dict[str, Any] | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"

    def as_event_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type, "message": self.message}
        for name in ("status", "retry_after", "upstream_type", "code"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data


class Provider(Protocol):
    def __call__(
        self, http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest
    ) -> AsyncGenerator[Chunk, None]: ...


def protocol_error(message: str) -> UpstreamError:
    return UpstreamError("protocol_error", message)


# --- usage ------------------------------------------------------------------


def make_usage(prompt: Any, completion: Any, total: Any = None, **extras: Any) -> dict[str, Any]:
    """Usage in our shape; missing counts are 0, total defaults to the sum."""
    prompt = prompt if isinstance(prompt, int) else 0
    completion = completion if isinstance(completion, int) else 0
    total = total if isinstance(total, int) else prompt + completion
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    usage.update({k: v for k, v in extras.items() if v is not None})
    return usage


# --- opening an upstream request, with retries -----------------------------

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
MAX_ATTEMPTS = 3
MAX_RETRY_AFTER = 10.0
ERROR_BODY_LIMIT = 64 * 1024


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or HTTP date)."""
    value: str | None = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_body(status: int, body: bytes, retry_after: float | None) -> UpstreamError:
    """The provider's own message from an HTTP error body, whatever its shape.

    All four vendors put it under `error`: a string (Ollama) or an object
    with `message` and `type` (OpenAI, Anthropic) or `status` (Gemini).
    """
    message, upstream_type, code = "", None, None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list) and len(parsed) == 1:  # Gemini without alt=sse
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, str):
        message = error
    elif isinstance(error, dict):
        message = str(error.get("message") or "")
        kind = error.get("type") or error.get("status")
        upstream_type = kind if isinstance(kind, str) else None
        code = error.get("code")
    if not message:
        snippet = body[:200].decode("utf-8", "replace").strip()
        message = f"upstream answered HTTP {status}" + (f": {snippet}" if snippet else "")
    return UpstreamError("upstream_error", message, status, retry_after, upstream_type, code)


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER)
    return min(0.25 * 2.0 ** (attempt - 1), 4.0) * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrets


parsed_url = lru_cache(maxsize=64)(httpx.URL)  # parsing one costs ~20 us per request


@asynccontextmanager
async def open_stream(
    http: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    is_retryable: Callable[[UpstreamError], bool] | None = None,
) -> AsyncIterator[httpx.Response]:
    """POST `body` and yield the 2xx streaming response.

    Connection failures and 429/5xx answers are retried (up to MAX_ATTEMPTS
    in all) with backoff; this runs before any token exists, so a retry can
    never duplicate text, and the caller's first-token deadline bounds it.
    """
    content = bytes(memoryview(orjson.dumps(body)))  # a right-sized copy: orjson's own buffer is 4 KiB, held all stream long
    response: httpx.Response | None = None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        request = http.build_request("POST", parsed_url(url), content=content, headers=headers)
        try:
            response = await http.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            failure = UpstreamError("upstream_unavailable", f"cannot connect to the upstream: {type(exc).__name__}")
            if isinstance(exc, httpx.ConnectTimeout):
                failure = UpstreamError("timeout", "connect timeout: no connection to the upstream")
            if attempt == MAX_ATTEMPTS:
                raise failure from None
            await anyio.sleep(backoff_delay(attempt, None))
            continue
        if response.is_success:
            break
        try:
            error_body = await read_at_most(response, ERROR_BODY_LIMIT)
        finally:
            await response.aclose()
        failure = error_from_body(response.status_code, error_body, parse_retry_after(response.headers))
        retryable = response.status_code in RETRY_STATUSES or bool(is_retryable and is_retryable(failure))
        if failure.code == "insufficient_quota" or not retryable or attempt == MAX_ATTEMPTS:
            raise failure
        await anyio.sleep(backoff_delay(attempt, failure.retry_after))
    assert response is not None
    try:
        yield response
    finally:
        await response.aclose()


async def read_at_most(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) >= limit:
            break
    return bytes(body[:limit])
