"""What every backend shares: the request it is given, the chunks it yields,
the error it raises, and the one place where an upstream request is opened
(with retries before the first token).

A provider is an async generator `stream(http, upstream, request)` that
yields `str` tokens (answer text), `Reasoning` and `ToolCallDelta` pieces in
the order the model produced them, and ends with exactly one `Final`; every
failure is an `UpstreamError` raised from inside it.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from functools import lru_cache
from itertools import count
from typing import Any, Protocol, cast

import anyio
import httpx
import orjson


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated request, as every provider receives it.

    `messages` are in OpenAI's chat shape: `role` (system, user, assistant,
    tool) and `content` (a string, or a list of `text` / `image_url` parts;
    None on an assistant turn that only called tools); an assistant turn may
    carry `tool_calls`, `reasoning_content` and `reasoning_details`; a tool
    turn carries `tool_call_id`. A plain text conversation is exactly
    `{"role", "content": str}` each, as before."""

    messages: list[dict[str, Any]]
    backend: str
    model: str
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None  # stop sequences; each backend names the field its own way
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools: {"type": "function", "function": {name, ...}}
    tool_choice: Any = None  # "auto", "none", "required" or {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None  # none, low, medium, high
    response_format: dict[str, Any] | None = None  # {"type": "json_object"} or {"type": "json_schema", ...}


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a backend sends its requests, and with which key."""

    base_url: str
    api_key: str = ""
    token_delay: float = 0.0  # echo only: a pause before each token, for demos and tests


@dataclass(frozen=True, slots=True)
class Final:
    """The last chunk of a successful generation."""

    finish_reason: str  # normalized: stop, length, content_filter, tool_calls, error or cancelled
    usage: dict[str, Any] | None = None
    # What the next request must send back for the turn to continue, beside the
    # text and the calls: OpenRouter-style `reasoning_details` (signed or
    # encrypted reasoning) and, per tool call index, its `extra_content`.
    round_trip: RoundTrip | None = None


@dataclass(frozen=True, slots=True)
class RoundTrip:
    reasoning_details: list[dict[str, Any]] = field(default_factory=list)
    call_extras: dict[int, dict[str, Any]] = field(default_factory=dict)  # index -> extra_content


@dataclass(frozen=True, slots=True)
class Reasoning:
    """A piece of what the model thinks, never part of the answer text."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of one tool call. The first piece of a call (by `index`) has
    its `id` and `name`; every piece may have a fragment of its JSON
    arguments, which joined are the arguments exactly as the model wrote them."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


# A chunk is a token (plain `str`: no allocation per token), a piece of
# reasoning or of a tool call, or the Final.
Chunk = str | Reasoning | ToolCallDelta | Final


@dataclass(slots=True)
class UpstreamError(Exception):
    """A generation that failed; becomes the client's `error` event.

    `type` is one of docs/design.md's error types; `upstream_type` / `code` carry
    the provider's own labels when it sent any.
    """

    type: str
    message: str
    status: int | None = None
    retry_after: float | None = None
    upstream_type: str | None = None
    code: Any = None
    usage: dict[str, Any] | None = field(default=None, compare=False)
    retryable: bool = field(default=False, compare=False)  # worth another attempt before any token

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"

    @classmethod
    def reported(cls, message: Any, kind: Any = None, code: Any = None, usage: dict[str, Any] | None = None) -> UpstreamError:
        """An error the upstream reported in its stream, from its fields as sent."""
        return cls("upstream_error", upstream_text(message) if message else "the upstream reported an error",
                   upstream_type=kind if isinstance(kind, str) else None, code=writable(code), usage=usage)

    def as_event_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type, "message": self.message}
        for name in ("status", "retry_after", "upstream_type", "code"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data


class Unsupported(Exception):
    """A request field a backend cannot honour: refused (400, naming the field
    and the backend) before any upstream call, never dropped silently."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


class Provider(Protocol):
    def __call__(self, http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]: ...


def protocol_error(message: str) -> UpstreamError:
    return UpstreamError("protocol_error", message)


# --- upstream values passed on ------------------------------------------------
# orjson reads JSON nested up to 1,024 levels but writes only 254, and `str()`
# of a value nested about a thousand deep overflows the stack (RecursionError):
# what an upstream sent is passed on through these, never through `str()`.


def upstream_text(value: Any) -> str:
    """An upstream's value where text goes (a message, a reason): a string as
    is, any other value as its JSON, its type's name when nested too deep."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return type(value).__name__


def writable(value: Any) -> Any:
    """`value` if orjson can write it again (the error event carries it), else None."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return None
    return value


def arguments_json(arguments: Any) -> str:
    """A tool call's arguments sent as a JSON value (Gemini, Ollama), as the JSON text a call carries."""
    try:
        return orjson.dumps(arguments).decode()
    except orjson.JSONEncodeError:
        raise protocol_error("the upstream sent tool call arguments nested too deep") from None


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """One upstream JSON payload, which must be an object."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise protocol_error(f"the upstream sent {what} that is not a JSON object")
    return value


def field_of(value: Any, *path: str) -> Any:
    """value[path[0]][path[1]]..., or None where the shape differs (R5: tolerate)."""
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


# --- usage ------------------------------------------------------------------


def make_usage(prompt: Any, completion: Any, total: Any = None, **extras: Any) -> dict[str, Any]:
    """Usage in our shape; missing counts are 0, total defaults to the sum."""
    prompt = prompt if isinstance(prompt, int) else 0
    completion = completion if isinstance(completion, int) else 0
    total = total if isinstance(total, int) else prompt + completion
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    usage.update({k: v for k, v in extras.items() if v is not None})
    return usage


def text_of(content: Any) -> str:
    """A message's content as text: a string as is, text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def new_call_id() -> str:
    """An id for a tool call from a provider that gives none (Gemini, Ollama)."""
    return "call_" + secrets.token_urlsafe(12)


def split_system(messages: list[dict[str, str]]) -> tuple[str, list[dict[str, str]]]:
    """The system messages joined into one prompt, and the other messages with
    consecutive same-role turns merged (Anthropic wants turns to alternate)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns: list[dict[str, str]] = []
    for m in (message for message in messages if message["role"] != "system"):
        if turns and turns[-1]["role"] == m["role"]:
            turns[-1]["content"] += "\n\n" + m["content"]
        else:
            turns.append(dict(m))
    return system, turns


def final_for(raw: str, reasons: Mapping[str, str], usage: dict[str, Any] | None) -> Final:
    """The Final for upstream finish reason `raw`, by the provider's table:
    `error` raises; an unknown one is `stop`, the raw value kept in usage."""
    reason = reasons.get(raw)
    if reason == "error":
        raise UpstreamError("upstream_error", f"the upstream stopped with '{raw}'", usage=usage)
    if reason is None:
        usage = {**(usage or make_usage(0, 0)), "upstream_finish_reason": raw}
    return Final(reason or "stop", usage)


# --- opening an upstream request, with retries -----------------------------

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
MAX_ATTEMPTS = 3
MAX_RETRY_AFTER = 10.0
ERROR_BODY_LIMIT = 64 * 1024


MAX_UPSTREAM_RETRY_AFTER = 86400.0  # a day: any longer wait an upstream asks for is read as this


def wait_of(seconds: float) -> float | None:
    """A header's seconds as a wait: NaN is none; the rest, `inf` and 1e309 included,
    within [0, a day], so that every use (a header, a JSON number, a sleep) is safe."""
    return None if math.isnan(seconds) else min(max(0.0, seconds), MAX_UPSTREAM_RETRY_AFTER)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or HTTP date);
    any value an upstream sends is a bounded number or None (R5: tolerate)."""
    try:
        wait = wait_of(float(headers["retry-after-ms"]) / 1000)
    except (KeyError, ValueError):
        wait = None
    if wait is not None:
        return wait
    value = headers.get("retry-after", "")
    try:
        return wait_of(float(value))
    except ValueError:
        pass
    try:
        return wait_of(parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError, IndexError):  # no date either (an empty or missing header included)
        return None


def error_from_body(status: int, body: bytes, retry_after: float | None) -> UpstreamError:
    """The provider's own message from an HTTP error body, whatever its shape.

    All four vendors put it under `error`: a string (Ollama) or an object
    with `message` and `type` (OpenAI, Anthropic) or `status` (Gemini).
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list) and len(parsed) == 1:  # Gemini without alt=sse
        parsed = parsed[0]
    error = field_of(parsed, "error")
    message = error if isinstance(error, str) else upstream_text(field_of(error, "message") or "")
    if not message:
        snippet = body[:200].decode("utf-8", "replace").strip()
        message = f"upstream answered HTTP {status}" + (f": {snippet}" if snippet else "")
    kind = field_of(error, "type") or field_of(error, "status")
    upstream_type = kind if isinstance(kind, str) else None
    return UpstreamError("upstream_error", message, status, retry_after, upstream_type, writable(field_of(error, "code")))


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER)
    return min(0.25 * 2.0 ** (attempt - 1), 4.0) * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy


parsed_url = lru_cache(maxsize=64)(httpx.URL)  # parsing one costs ~20 us per request
USER_AGENT = "asgi-stream"


def open_stream(http: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]) -> UpstreamResponse:
    """POST `body`: `async with` it, the 2xx streaming response; a failure to connect
    or an HTTP error is an UpstreamError, marked retryable when it is one."""
    content = bytes(memoryview(orjson.dumps(body)))  # a right-sized copy: orjson's own buffer is 4 KiB, held all stream long
    # Not http.build_request: merging the client's defaults into every request was 5% of a
    # stream's start (bench/start-path.md), and they are not wanted: its cookie jar (shared by
    # every user's requests), its accept-encoding (a compressing proxy holds tokens back). Only
    # the client's timeouts are kept.
    request = httpx.Request("POST", parsed_url(url), content=content, headers={"user-agent": USER_AGENT, **headers},
                            extensions={"timeout": http.timeout.as_dict()})
    return UpstreamResponse(http, request)


class UpstreamResponse:
    """The response to an upstream request, open for the `async with` block. A class, not an
    @asynccontextmanager: that one's generator (a frame holding the body's dicts, an entry
    in the loop's set of async generators) and wrapper were ~1 KiB of every open stream
    (bench/stream_memory.py)."""

    __slots__ = ("http", "request", "response")

    def __init__(self, http: httpx.AsyncClient, request: httpx.Request) -> None:
        self.http, self.request = http, request
        self.response: httpx.Response | None = None

    async def __aenter__(self) -> httpx.Response:
        try:
            response = await self.http.send(self.request, stream=True)
        except httpx.ConnectTimeout:
            raise UpstreamError("timeout", "connect timeout: no connection to the upstream", retryable=True) from None
        except httpx.RemoteProtocolError as exc:
            # Includes the keep-alive race: a pooled connection the upstream closed
            # just as it was reused. Nothing was answered, so a retry is safe.
            raise UpstreamError("protocol_error", f"the upstream broke the connection before answering: {exc}", retryable=True) from None
        except httpx.NetworkError as exc:
            message = f"cannot connect to the upstream: {type(exc).__name__}"
            raise UpstreamError("upstream_unavailable", message, retryable=True) from None
        try:
            if not response.is_success:
                body_read = await read_at_most(response, ERROR_BODY_LIMIT)
                failure = error_from_body(response.status_code, body_read, parse_retry_after(response.headers))
                failure.retryable = response.status_code in RETRY_STATUSES and failure.code != "insufficient_quota"
                raise failure
        except BaseException:
            await response.aclose()
            raise
        self.response = response
        return response

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.response is not None
        await self.response.aclose()


def body_pieces(response: httpx.Response) -> AsyncIterator[bytes]:
    """The response body read by read. Without a content encoding, httpx's raw
    iterator: `aiter_bytes` would add one more generator and two pass-through
    calls to every read, that is to every token (each is its own HTTP chunk).
    A body already read (a test's mock response) only `aiter_bytes` replays."""
    identity = response.headers.get("content-encoding", "identity").strip().lower() == "identity"
    if identity and not response.is_stream_consumed:
        return response.aiter_raw()
    return response.aiter_bytes()


def retried(provider: Provider) -> Provider:
    """`provider`, run again (up to MAX_ATTEMPTS in all, with backoff) while it
    fails retryably before its first chunk: a retry after a token would
    duplicate text. A retry that cannot start before the caller's deadline
    (the first-token deadline) is not tried: the failure itself is reported."""

    async def stream(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
        for attempt in count(1):  # pragma: no branch - the last attempt returns or raises
            sent = False
            try:
                async with aclosing(provider(http, upstream, request)) as chunks:
                    async for chunk in chunks:
                        sent = True
                        yield chunk
                return
            except UpstreamError as failure:
                delay = backoff_delay(attempt, failure.retry_after)
                if sent or not failure.retryable or attempt == MAX_ATTEMPTS:
                    raise
                # A cancel called but not yet delivered (the client left in the loop turn this
                # failure arrived) reads below as a deadline of -inf: let it land first, so the
                # stream ends as cancelled rather than with a failure it would have retried.
                await anyio.lowlevel.checkpoint_if_cancelled()
                if anyio.current_time() + delay >= anyio.current_effective_deadline():
                    raise
                await anyio.sleep(delay)

    return stream


@dataclass(frozen=True, slots=True)
class Attempt:
    """One target of a fallback chain: the backend (by name), its provider and upstream, the model."""

    backend: str
    provider: Provider
    upstream: Upstream
    model: str
    first_token_timeout: float = math.inf  # the target's own deadline for its first chunk, within the request's


SERVED = "served"  # an attempt's outcome when its first chunk came: it serves the request
CANCELLED = "cancelled"
Tried = Callable[[Attempt, str], None]  # told of each attempt's outcome: SERVED, CANCELLED or outcome_of(failure)


CIRCUIT_OPEN = "circuit_open"  # the code of an attempt skipped by its upstream's circuit breaker (providers/breaker.py)
NO_KEY = "no_key_in_service"  # the code of an attempt whose key pool had no key to give (providers/pools.py)


def outcome_of(failure: UpstreamError) -> str:
    """A failed attempt's label, from a small set: the gateway's own reason for not
    asking the upstream, else the HTTP status, else the error type."""
    if failure.code in (CIRCUIT_OPEN, NO_KEY):
        return str(failure.code)
    return str(failure.status) if failure.status is not None else failure.type


def fallback(attempts: Sequence[Attempt], tried: Tried) -> Provider:
    """One attempt per target, in order (no retries of a target: the chain is the
    retry). A target that fails retryably before its first chunk hands the request
    to the next; its first chunk commits the request to it, so nothing is switched
    and no text repeated after. A failure that is not retryable ends the chain at
    once; the last target's failure is reported. A cancel (DELETE, the client gone,
    the request's own deadline) ends the running attempt and starts no other.
    `tried` hears every attempt's outcome, SERVED before the first chunk is yielded."""

    async def stream(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
        for number, attempt in enumerate(attempts):  # `upstream` is unused: each attempt carries its own
            if number:
                # A cancel called as the failure arrived has not landed yet: let it, so no next attempt starts.
                await anyio.lowlevel.checkpoint_if_cancelled()
            asked = replace(request, backend=attempt.backend, model=attempt.model)
            async with aclosing(attempt.provider(http, attempt.upstream, asked)) as chunks:
                try:
                    first = await first_chunk(chunks, attempt)
                except UpstreamError as exc:
                    tried(attempt, outcome_of(exc))
                    if not exc.retryable or number == len(attempts) - 1:
                        raise
                    continue
                except anyio.get_cancelled_exc_class():
                    tried(attempt, CANCELLED)
                    raise
                tried(attempt, SERVED)
                yield first
                async for chunk in chunks:
                    yield chunk
                return

    return stream


async def first_chunk(chunks: AsyncGenerator[Chunk, None], attempt: Attempt) -> Chunk:
    """The attempt's first chunk within its own first-token deadline. Before it nothing
    was sent, so a connection cut or a silence is worth the next target (a stream that
    ends well-formed but empty is malformed, as it would be without an alias)."""
    with anyio.move_on_after(attempt.first_token_timeout):
        try:
            return await anext(chunks)
        except StopAsyncIteration:
            raise UpstreamError("protocol_error", "the upstream stream ended without a final chunk") from None
        except httpx.HTTPError as exc:
            message = f"the upstream stream broke before any output: {str(exc) or type(exc).__name__}"
            raise UpstreamError("protocol_error", message, retryable=True) from None
    message = f"first-token deadline of {attempt.backend}: no output within {attempt.first_token_timeout:g} s"
    raise UpstreamError("timeout", message, retryable=True)


async def read_at_most(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    # closed now, not when garbage collected (httpx types it as a plain AsyncIterator)
    async with aclosing(cast("AsyncGenerator[bytes, None]", response.aiter_bytes())) as pieces:
        async for piece in pieces:
            body += piece
            if len(body) >= limit:
                break
    return bytes(body[:limit])
