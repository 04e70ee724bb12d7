"""asgi-stream: one handwritten ASGI callable that streams LLM tokens to HTTP
clients as Server-Sent Events, keeps provider keys on the server, and stops
the upstream generation when nobody is listening any more.

Read top to bottom, in the order data flows: configuration, the request and
its validation, SSE framing, the stream record, the generation that fills it,
the writer that drains it to a client, and the ASGI entry point.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import math
import os
import re
import secrets
import sys
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
import httpx
import orjson

import openai_api
from ledger import UsageLedger, target_problem, usage_report
from providers import ChatRequest, Final, Provider, Upstream, UpstreamError, anthropic, echo, gemini, make_usage, ollama, openai, retried
from providers.idle import UPSTREAM_IDLE, IdleDeadline, loop_clock
from providers.lines import LineTooLong
from sse import FIRST_CHUNK, HEARTBEAT, opening_chunk
from stores import Refused, Store
from stores.memory import MemoryStore, StreamRecord, StreamRegistry

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("asgi_stream")


# --- backends ---------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    stream: Provider
    default_model: str
    key_variable: str | None  # None: needs no key
    url_variable: str | None
    default_url: str
    model_pattern: re.Pattern[str] = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-:/@+]{0,255}")


BACKENDS: dict[str, Backend] = {
    "echo": Backend(echo.stream_echo, echo.DEFAULT_MODEL, None, None, ""),
    "openai": Backend(openai.stream_openai, openai.DEFAULT_MODEL, "OPENAI_API_KEY", "OPENAI_BASE_URL", "https://api.openai.com/v1"),
    "anthropic": Backend(anthropic.stream_anthropic, anthropic.DEFAULT_MODEL, "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL",
                         "https://api.anthropic.com"),
    "ollama": Backend(ollama.stream_ollama, ollama.DEFAULT_MODEL, None, "OLLAMA_BASE_URL", "http://localhost:11434"),
    "gemini": Backend(gemini.stream_gemini, gemini.DEFAULT_MODEL, "GEMINI_API_KEY", "GEMINI_BASE_URL",
                      "https://generativelanguage.googleapis.com", re.compile(gemini.MODEL_PATTERN)),
}


# --- configuration ------------------------------------------------------------


class ConfigError(Exception):
    """An environment variable with an unusable value; names the variable."""


# Numeric settings: attribute -> (variable, default, minimum). An integer
# default makes an integer setting.
NUMBERS: dict[str, tuple[str, float, float]] = {
    "max_tokens_limit": ("MAX_TOKENS_LIMIT", 8192, 1),
    "max_tokens": ("MAX_TOKENS", 1024, 1),
    "max_body_bytes": ("MAX_BODY_BYTES", 1_048_576, 1),
    "max_streams": ("MAX_STREAMS", 1000, 1),
    "max_streams_per_key": ("MAX_STREAMS_PER_KEY", 100, 1),
    "connect_timeout": ("CONNECT_TIMEOUT_SECONDS", 10.0, 0.001),
    "first_token_timeout": ("FIRST_TOKEN_TIMEOUT_SECONDS", 120.0, 0.001),
    "idle_timeout": ("IDLE_TIMEOUT_SECONDS", 60.0, 0.001),
    "total_timeout": ("TOTAL_TIMEOUT_SECONDS", 600.0, 0.001),
    "heartbeat": ("HEARTBEAT_SECONDS", 15.0, 0.001),
    "resume_grace": ("RESUME_GRACE_SECONDS", 5.0, 0),
    "resume_ttl": ("RESUME_TTL_SECONDS", 60.0, 0),
    "body_timeout": ("BODY_TIMEOUT_SECONDS", 30.0, 0.001),  # an unfinished body then gets 408
    "send_timeout": ("SEND_TIMEOUT_SECONDS", 30.0, 0.001),  # a client taking no bytes this long is dropped
    "stream_buffer_bytes": ("STREAM_BUFFER_BYTES", 1_048_576, 1024),  # events held per stream for resume
    "echo_delay": ("ECHO_DELAY_SECONDS", 0.05, 0),  # paced for people; tests set 0
    "owner_lease": ("OWNER_LEASE_SECONDS", 10.0, 0.1),  # with REDIS_URL: a dead owner's streams end within this
}


@dataclass(frozen=True)
class Config:
    upstreams: dict[str, Upstream]  # the backends that can serve, with their keys
    default_backend: str
    default_model: str | None
    api_keys: dict[str, str]  # key -> name
    cors_origins: frozenset[str]
    usage_db: str
    max_tokens_limit: int
    max_tokens: int
    max_body_bytes: int
    max_streams: int
    max_streams_per_key: int
    connect_timeout: float
    first_token_timeout: float
    idle_timeout: float
    total_timeout: float
    heartbeat: float
    resume_grace: float
    resume_ttl: float
    body_timeout: float
    send_timeout: float
    stream_buffer_bytes: int
    echo_delay: float
    owner_lease: float
    redis_url: str
    log_level: int = logging.INFO  # of the per-stream log line (LOG_LEVEL)


def backends_listing(config: Config) -> bytes:
    """GET /backends: the backends this server can serve, each with the model a
    request naming none gets (what the page offers)."""
    def model(name: str) -> str:
        return (name == config.default_backend and config.default_model) or BACKENDS[name].default_model

    backends = [{"name": name, "default_model": model(name)} for name in config.upstreams]
    return orjson.dumps({"default_backend": config.default_backend, "backends": backends})


def _number(env: Mapping[str, str], name: str, default: float, low: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if isinstance(default, int) else float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {'an integer' if isinstance(default, int) else 'a number'}") from None
    if not low <= value < math.inf:
        raise ConfigError(f"{name}={raw!r} must be at least {low}")
    return value


def load_config(env: Mapping[str, str]) -> Config:
    """Read every setting once; an invalid value stops startup."""
    numbers = {attr: _number(env, *spec) for attr, spec in NUMBERS.items()}
    if not env.get("MAX_TOKENS", "").strip():  # the default never exceeds a lower limit
        numbers["max_tokens"] = min(numbers["max_tokens"], numbers["max_tokens_limit"])
    if numbers["max_tokens"] > numbers["max_tokens_limit"]:
        raise ConfigError(f"MAX_TOKENS={numbers['max_tokens']} is above MAX_TOKENS_LIMIT={numbers['max_tokens_limit']}")
    upstreams = {"echo": Upstream("", token_delay=numbers["echo_delay"])}
    for name, backend in BACKENDS.items():
        key = env.get(backend.key_variable, "") if backend.key_variable else ""
        url = env.get(backend.url_variable, "") if backend.url_variable else ""
        if key or (url and backend.key_variable is None):
            base = url or backend.default_url
            if not base.startswith(("http://", "https://")):
                raise ConfigError(f"{backend.url_variable}={base!r} must start with http:// or https://")
            upstreams[name] = Upstream(base, key)
    default = env.get("DEFAULT_BACKEND", "").strip()
    if default and default not in BACKENDS:
        raise ConfigError(f"DEFAULT_BACKEND={default!r} is not one of {', '.join(BACKENDS)}")
    if default and default not in upstreams:
        raise ConfigError(f"DEFAULT_BACKEND={default!r} is not configured (its key is not set)")
    preferred = ("openai", "anthropic", "gemini", "ollama", "echo")
    default = default or next(name for name in preferred if name in upstreams)
    api_keys: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in env.get("API_KEYS", "").split(","))):
        name, colon, key = entry.partition(":")
        if not colon or not name or not key:
            raise ConfigError("API_KEYS must be name:key pairs separated by commas")
        api_keys[key] = name
    origins = frozenset(o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip())
    level = env.get("LOG_LEVEL", "").strip().upper() or "INFO"
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL={env['LOG_LEVEL']!r} is not one of {', '.join(LOG_LEVELS)}")
    usage_db = env.get("USAGE_DB", "usage.db").strip()
    if problem := target_problem(usage_db):
        raise ConfigError(f"USAGE_DB {problem}")
    redis_url = env.get("REDIS_URL", "").strip()
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"REDIS_URL must start with redis://, rediss:// or unix:// (got {redis_url.partition(':')[0][:20]!r}...)")
    return Config(upstreams, default, env.get("DEFAULT_MODEL", "").strip() or None, api_keys, origins,
                  usage_db, **numbers, redis_url=redis_url, log_level=logging.getLevelName(level))  # type: ignore[arg-type]


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def attach_stream_log(level: int) -> None:
    """Servers other than `python -m asgi_stream` (uvicorn's CLI among them)
    configure only their own loggers, so our INFO line would be dropped: give
    ours a stderr handler, unless the host set up logging (no line twice)."""
    log.setLevel(level)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


# --- requests and their validation -------------------------------------------


class HTTPError(Exception):
    """A refusal before any stream starts: status, error type, message."""

    def __init__(self, status: int, type: str, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type, message, headers or []


def invalid(message: str) -> HTTPError:
    return HTTPError(400, "invalid_request", message)


ROLES = ("system", "user", "assistant")


def parse_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty array of {role, content} objects")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_show(role)}")
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string, got {_show(content)}")
        messages.append({"role": role, "content": content})
    return messages


def _show(value: Any) -> str:
    try:
        text = orjson.dumps(value).decode() if value is not None else "nothing"
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _loads(data: bytes | str, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"{what} is not valid JSON: {exc}") from None


def _body_field(fields: dict[str, Any], query: dict[str, str], name: str, kind: type) -> Any:
    """A body field of exactly `kind`, else the query parameter (a string)."""
    if name in fields and fields[name] is not None:
        value = fields[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not kind:
            wanted = {int: "an integer", float: "a number", str: "a string"}[kind]
            raise invalid(f"{name} must be {wanted}, got {_show(value)}")
        return value
    if name not in query:
        return None
    raw = query[name]
    if kind is int:
        if not raw.isascii() or not raw.isdigit():
            raise invalid(f"{name} must be an integer, got {raw[:40]!r}")
        if len(raw) > 20:  # past every limit here, and int() refuses past 4,300 digits
            raise invalid(f"{name} is out of range, got {_show(raw)}")
        return int(raw)
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise invalid(f"{name} must be a number, got {raw[:40]!r}") from None
    return raw


def parse_chat_request(method: str, query: dict[str, str], body: bytes, config: Config) -> ChatRequest:
    """Validate a start-stream request (any of the three forms) strictly."""
    fields: dict[str, Any] = {}
    if method == "GET":
        if "prompt" in query and "messages" in query:
            raise invalid("give prompt or messages, not both")
        if "prompt" in query:
            messages = [{"role": "user", "content": query["prompt"]}]
        elif "messages" in query:
            messages = parse_messages(_loads(query["messages"], "messages"))
        else:
            raise invalid("prompt (or messages, a JSON array) is required")
    else:
        data = _loads(body, "the request body")
        if isinstance(data, dict):
            fields = data
            if "messages" not in data:
                raise invalid("messages is required")
            messages = parse_messages(data["messages"])
        elif isinstance(data, list):
            messages = parse_messages(data)  # the article's form: a bare array
        else:
            raise invalid("the body must be a JSON object or an array of messages")

    backend = _body_field(fields, query, "backend", str)
    backend = config.default_backend if backend is None else backend
    if backend not in BACKENDS:
        raise invalid(f"backend must be one of {', '.join(BACKENDS)}, got {_show(backend)}")
    spec = BACKENDS[backend]
    if backend not in config.upstreams:
        raise invalid(f"backend {backend!r} is not configured here ({spec.key_variable or spec.url_variable} is not set)")
    default_model = config.default_model if backend == config.default_backend and config.default_model else spec.default_model
    model = _body_field(fields, query, "model", str)
    model = default_model if model is None else model
    if not spec.model_pattern.fullmatch(model):
        raise invalid(f"model {_show(model)} is not a valid model name for {backend}")
    max_tokens = _body_field(fields, query, "max_tokens", int)
    if max_tokens is None:
        max_tokens = config.max_tokens
    if not 1 <= max_tokens <= config.max_tokens_limit:
        raise invalid(f"max_tokens must be from 1 to {config.max_tokens_limit}, got {_show(max_tokens)}")
    temperature = _body_field(fields, query, "temperature", float)
    if temperature is not None and not 0 <= temperature <= 2:
        raise invalid(f"temperature must be from 0 to 2, got {temperature}")
    return ChatRequest(messages, backend, model, max_tokens, temperature)


def is_json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_body(receive: Receive, headers: dict[str, str], config: Config) -> bytes:
    """The request body, read piece by piece and refused at the limit."""
    limit = config.max_body_bytes
    too_large = HTTPError(413, "payload_too_large", f"the request body is larger than {limit} bytes")
    declared = headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 20 or int(declared) > limit):  # isdigit alone passes "²"
        raise too_large
    body = bytearray()
    with anyio.move_on_after(config.body_timeout) as scope:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            body += message.get("body", b"")
            if len(body) > limit:
                raise too_large
            if not message.get("more_body", False):
                return bytes(body)
    assert scope.cancelled_caught
    raise HTTPError(408, "request_timeout", f"the request body did not arrive within {config.body_timeout:g} s")


class ClientGone(Exception):
    """The client left before the request was complete."""


# --- metrics and the per-stream log line -------------------------------


class Histogram:
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        self.counts[bisect_left(self.BUCKETS, value)] += 1  # the first bound >= value

    def samples(self, name: str) -> list[str]:
        bounds = [f"{b:g}" for b in self.BUCKETS] + ["+Inf"]
        buckets = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(bounds, itertools.accumulate(self.counts), strict=True)]
        return [*buckets, f"{name}_sum {self.sum:.6f}", f"{name}_count {sum(self.counts)}"]


class Metrics:
    def __init__(self) -> None:
        self.active = 0
        self.active_by_key: dict[str | None, int] = {}
        self.streams: Counter[tuple[str, str]] = Counter()  # (backend, finish reason)
        self.tokens: Counter[str] = Counter()  # by backend
        self.upstream_errors: Counter[str] = Counter()  # by error type
        self.rejected: Counter[str] = Counter()  # by error type
        self.time_to_first_token = Histogram()
        self.stream_duration = Histogram()

    def render(self, held: int) -> bytes:
        def family(name: str, kind: str, help: str, samples: list[str]) -> list[str]:
            return [f"# HELP asgi_stream_{name} {help}", f"# TYPE asgi_stream_{name} {kind}", *samples]

        def counter(name: str, help: str, labels: tuple[str, ...], values: Counter[Any]) -> list[str]:
            samples = []
            for key, value in sorted(values.items()):
                keys = key if isinstance(key, tuple) else (key,)
                pairs = ",".join(f'{label}="{v}"' for label, v in zip(labels, keys, strict=True))
                samples.append(f"asgi_stream_{name}{{{pairs}}} {value}")
            return family(name, "counter", help, samples)

        lines = [
            *family("active_streams", "gauge", "Streams admitted and not yet done.", [f"asgi_stream_active_streams {self.active}"]),
            *family("held_streams", "gauge", "Streams held for resume (running or finished).", [f"asgi_stream_held_streams {held}"]),
            *counter("streams_total", "Finished streams.", ("backend", "finish_reason"), self.streams),
            *counter("tokens_total", "Token events sent.", ("backend",), self.tokens),
            *counter("upstream_errors_total", "Streams that ended in an error.", ("type",), self.upstream_errors),
            *counter("rejected_total", "Requests refused before a stream.", ("type",), self.rejected),
            *family("time_to_first_token_seconds", "histogram", "From admission to the first token.",
                    self.time_to_first_token.samples("asgi_stream_time_to_first_token_seconds")),
            *family("duration_seconds", "histogram", "From admission to done.",
                    self.stream_duration.samples("asgi_stream_duration_seconds")),
        ]  # fmt: skip
        return ("\n".join(lines) + "\n").encode()


def stream_facts(record: StreamRecord, ended_clock: float) -> dict[str, Any]:
    """What the ledger row and the log line say about a finished stream."""
    usage = record.usage or {}
    ttft = record.first_token_after
    return {
        "stream_id": record.id,
        "key_name": record.key_name,
        "backend": record.request.backend,
        "model": record.request.model,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.started)),
        "time_to_first_token_ms": round(ttft * 1000, 3) if ttft is not None else None,
        "duration_ms": round((ended_clock - record.started_clock) * 1000, 3),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "total_tokens": usage.get("total_tokens", 0),
        "estimated": int(bool(usage.get("estimated"))),
        "finish_reason": record.finish_reason,
        "error_type": record.error.type if record.error else None,
        "client_disconnected": int(record.ever_disconnected),
        "route": record.route,
    }


def estimate_usage(record: StreamRecord) -> dict[str, Any]:
    """When the provider sent no counts: tokens as streamed, prompt at ~4 chars a token."""
    prompt_chars = sum(len(m["content"]) for m in record.request.messages)
    return make_usage(-(-prompt_chars // 4), record.tokens, estimated=True)


# --- the gateway ---------------------------------------------------------------

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET",), "/healthz": ("GET",), "/metrics": ("GET",), "/backends": ("GET",), "/chat/stream": ("GET", "POST"),
    **openai_api.ROUTES,
}
INDEX_FILE = Path(__file__).with_name("index.html")
# Server's graceful timeout + this must stay below the orchestrator's stop grace (docker-compose.yml).
LEDGER_SHUTDOWN_WAIT_SECONDS = 5.0
MAX_HEADER_BYTES = 65536


UPSTREAM_POOLS = 32
POOL_SHARE = 32  # open upstream requests a pool takes before the next pool is used


class PoolShards(httpx.AsyncBaseTransport):
    """Several connection pools, each filled to POOL_SHARE open requests before
    the next is used. httpcore's pool scans all of its connections at every
    request start and end: with 1,000 streams open on one pool, that scan took
    40% of the gateway's CPU. Filling rather than round robin keeps requests
    one after another on one warm keep-alive connection: round robin opened a
    new connection in each of the pools first, a TCP connect before the first
    token of one request in six of the first two hundred."""

    def __init__(self, count: int, limits: httpx.Limits):
        tls = httpx.create_ssl_context()  # one for all: building one costs ~20 ms
        self._pools = [httpx.AsyncHTTPTransport(verify=tls, limits=limits) for _ in range(count)]
        self._open = [0] * count  # requests whose response is not closed yet, per pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shard = next((i for i, n in enumerate(self._open) if n < POOL_SHARE), None)
        if shard is None:  # all full: the least loaded
            shard = min(range(len(self._open)), key=self._open.__getitem__)
        self._open[shard] += 1
        try:
            response = await self._pools[shard].handle_async_request(request)
        except BaseException:
            self._open[shard] -= 1
            raise
        response.stream = CountedStream(response.stream, self._open, shard)
        return response

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class CountedStream(httpx.AsyncByteStream):
    """A response body that counts its request out of its pool when closed.
    Iterating is the wrapped stream's own: nothing added per read."""

    def __init__(self, stream: Any, open_requests: list[int], shard: int):
        self._stream, self._open_requests, self._shard = stream, open_requests, shard

    def __aiter__(self) -> Any:
        return self._stream.__aiter__()

    async def aclose(self) -> None:
        if self._shard >= 0:
            self._open_requests[self._shard] -= 1
            self._shard = -1
        await self._stream.aclose()


class Gateway:
    """The ASGI application. Settings are read once, at lifespan startup or,
    under servers without lifespan (daphne), at the first request."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        self._environ = environ
        self._config: Config | None = None
        self._http: httpx.AsyncClient | None = None
        self.metrics = Metrics()
        self.registry = StreamRegistry(60.0)
        self.store: Store = MemoryStore(self.registry)
        self.ledger: UsageLedger | None = None
        self.unaccounted = 0  # streams admitted whose ledger row is not queued yet
        self._index = b""

    @property
    def config(self) -> Config:
        if self._config is None:
            config = load_config(os.environ if self._environ is None else self._environ)
            attach_stream_log(config.log_level)
            self.registry = StreamRegistry(config.resume_ttl)
            self.ledger = UsageLedger(config.usage_db) if config.usage_db else None
            self.store = MemoryStore(self.registry)
            if config.redis_url:  # imported only when asked for: coredis is an optional extra
                try:
                    from stores.redis import RedisStore
                except ImportError as exc:
                    raise ConfigError(f"REDIS_URL is set but its client is missing ({exc}): pip install 'asgi-stream[redis]'") from None
                self.store = RedisStore(config, self.registry, self.ledger, stream_facts)
            self._index = INDEX_FILE.read_bytes() if INDEX_FILE.exists() else b"<!doctype html><title>asgi-stream</title>"
            self._config = config
        return self._config

    @property
    def http(self) -> httpx.AsyncClient:
        """The one shared upstream client (opened on first use without lifespan)."""
        if self._http is None:
            cfg = self.config
            connect = cfg.connect_timeout
            self._http = httpx.AsyncClient(
                # no read timeout: the first-token, then the idle deadline are cancel scopes in drive
                timeout=httpx.Timeout(connect=connect, read=None, write=connect, pool=connect),
                transport=PoolShards(UPSTREAM_POOLS, limits=httpx.Limits(max_connections=None, max_keepalive_connections=8)),
                follow_redirects=False,
            )
        return self._http

    async def aclose(self) -> None:
        # Servers cancel open streams before the lifespan shutdown but do not
        # wait for them: give their last ledger rows time to be written.
        with anyio.move_on_after(LEDGER_SHUTDOWN_WAIT_SECONDS):
            while self.unaccounted:  # noqa: ASYNC110 - a rare, bounded wait at shutdown
                await anyio.sleep(0.01)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self.ledger is not None:
            await anyio.to_thread.run_sync(self.ledger.close)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            try:
                await self.route(scope, receive, send)
            except (HTTPError, openai_api.CompletionError, Refused) as exc:  # Refused: the store's, with a Retry-After
                self.metrics.rejected[exc.type] += 1
                body = orjson.dumps({"error": {"type": exc.type, "message": exc.message}})
                body = openai_api.error_body(exc) if scope["path"].startswith("/v1/") else body
                await send_response(send, exc.status, body, b"application/json", exc.headers + self.cors_headers(scope))
            except ClientGone:
                pass

    async def lifespan(self, receive: Receive, send: Send) -> None:
        async with AsyncExitStack() as running:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        self.http  # noqa: B018 - reads the settings and opens the shared client
                        await running.enter_async_context(self.store.running())
                    except (ConfigError, Refused) as exc:
                        await send({"type": "lifespan.startup.failed", "message": f"asgi-stream: {exc}"})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.aclose()
                    await running.aclose()  # a shared store writes the streams' last events first
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    # --- routing, auth, CORS, limits

    async def route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:  # servers' own limits vary (httptools: none)
            raise HTTPError(431, "invalid_request", f"the request headers are larger than {MAX_HEADER_BYTES} bytes")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        if "access_token" in query:  # servers' access logs print this scope's query: keep the key out of them
            scope["query_string"] = urlencode({**query, "access_token": "[redacted]"}).encode()
        allowed = ROUTES.get(path) or (("DELETE",) if path.startswith("/chat/stream/") else None)
        if allowed is None:
            raise HTTPError(404, "not_found", f"no route for {path[:100]}")
        if method == "OPTIONS":
            return await self.preflight(headers, send, path)
        if method not in allowed:
            allow = ", ".join(allowed)
            raise HTTPError(405, "method_not_allowed", f"{path[:100]} allows {allow}", [(b"allow", allow.encode())])
        if path == "/healthz":
            self.config  # noqa: B018 - without lifespan (daphne) bad settings must fail the health check
            return await send_response(send, 200, orjson.dumps({"status": "ok", **self.store.health()}), b"application/json")
        if path == "/":
            self.config  # noqa: B018 - loads the page with the settings
            return await send_response(send, 200, self._index, b"text/html; charset=utf-8")
        key_name = self.authenticate(headers, query)
        if path == "/metrics":
            ledger_metrics = self.ledger.metrics() if self.ledger is not None else b""
            return await send_response(send, 200, self.metrics.render(len(self.registry)) + ledger_metrics, b"text/plain; version=0.0.4")
        if path in openai_api.ROUTES:
            if method == "POST" and not is_json_media_type(headers.get("content-type", "")):
                raise HTTPError(415, "unsupported_media_type", "POST bodies must be application/json")
            body = await read_body(receive, headers, self.config)
            return await openai_api.serve(self, BACKENDS, path, scope, body, key_name, receive, send)
        if path == "/backends":
            return await send_response(send, 200, backends_listing(self.config), b"application/json")
        if method == "DELETE":
            return await self.cancel_stream(path.removeprefix("/chat/stream/"), key_name, scope, send)
        last_event_id = _last_event_id(scope)
        if last_event_id is not None:
            return await self.resume_stream(last_event_id, key_name, scope, receive, send)
        await self.start_stream(scope, headers, query, key_name, receive, send)

    def authenticate(self, headers: dict[str, str], query: dict[str, str]) -> str | None:
        """The API key's name; None when no keys are configured (open)."""
        keys = self.config.api_keys
        if not keys:
            return None
        auth = headers.get("authorization", "")
        offered = auth[7:].strip() if auth[:7].lower() == "bearer " else query.get("access_token", "")
        name = None
        for key, key_name in keys.items():  # compare with every key, in constant time
            if hmac.compare_digest(key.encode(), offered.encode("utf-8", "replace")):
                name = key_name
        if not offered or name is None:
            message = "a valid API key is required: Authorization: Bearer <key>"
            raise HTTPError(401, "unauthorized", message, [(b"www-authenticate", b"Bearer")])
        return name

    def cors_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        origins = self._config.cors_origins if self._config else frozenset()
        origin = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"origin"), None)
        if not origins or origin is None or not ("*" in origins or origin in origins):
            return []
        allow = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        return [*allow, (b"access-control-expose-headers", b"X-Stream-ID")]

    async def preflight(self, headers: dict[str, str], send: Send, path: str) -> None:
        origins = self.config.cors_origins
        origin = headers.get("origin")
        if not origins or origin is None or not ("*" in origins or origin in origins):
            raise HTTPError(403, "forbidden", "this origin is not allowed (CORS_ORIGINS)")
        await send_response(send, 204, b"", None, [
            (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
            (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
            (b"access-control-allow-headers", openai_api.allowed_headers(headers) if path in openai_api.ROUTES
             else b"Authorization, Content-Type, Last-Event-ID"),
            (b"access-control-max-age", b"600"),
        ])  # fmt: skip

    def admit(self, key_name: str | None) -> None:
        cfg, metrics, retry = self.config, self.metrics, [(b"retry-after", b"1")]
        if metrics.active >= cfg.max_streams:
            raise HTTPError(503, "overloaded", f"the server is at its limit of {cfg.max_streams} streams", retry)
        if cfg.api_keys and metrics.active_by_key.get(key_name, 0) >= cfg.max_streams_per_key:
            raise HTTPError(429, "rate_limited", f"this key is at its limit of {cfg.max_streams_per_key} streams", retry)
        metrics.active += 1
        self.unaccounted += 1
        metrics.active_by_key[key_name] = metrics.active_by_key.get(key_name, 0) + 1

    def release(self, key_name: str | None) -> None:
        self.metrics.active -= 1
        left = self.metrics.active_by_key[key_name] - 1
        if left:
            self.metrics.active_by_key[key_name] = left
        else:
            del self.metrics.active_by_key[key_name]

    async def hold(self, record: StreamRecord) -> None:
        """Take a slot for a new stream: this process's, then the store's (shared across replicas with REDIS_URL)."""
        self.admit(record.key_name)
        try:
            await self.store.hold(record)
        except BaseException:  # refused, or cancelled on the way: the slot was not taken
            self.release(record.key_name)
            self.unaccounted -= 1
            raise

    # --- starting, resuming and cancelling streams

    async def start_stream(
        self, scope: Scope, headers: dict[str, str], query: dict[str, str], key_name: str | None, receive: Receive, send: Send
    ) -> None:
        cfg = self.config
        body = b""
        if scope["method"] == "POST":
            if not is_json_media_type(headers.get("content-type", "")):
                raise HTTPError(415, "unsupported_media_type", "POST bodies must be application/json")
            body = await read_body(receive, headers, cfg)
        request = parse_chat_request(scope["method"], query, body, cfg)
        record = StreamRecord(secrets.token_urlsafe(16), key_name, request, cfg.stream_buffer_bytes)
        await self.hold(record)
        backend = BACKENDS[request.backend]
        # Spawned tasks always run to their first checkpoint (even when cancelled at
        # once), and generate() takes ownership of the stream's ending before that.
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self.generate, record, backend.stream, cfg.upstreams[request.backend])
            await self.serve_reader(record, 0, scope, receive, send, opening_chunk(record.id))
            await self.linger(record)

    async def resume_stream(self, last_event_id: str, key_name: str | None, scope: Scope, receive: Receive, send: Send) -> None:
        """Replay what followed `last_event_id`, then follow the generation.
        Whatever cannot be resumed gets 204, which stops EventSource."""
        stream_id, _, position = last_event_id.rpartition(".")
        readable = position.isascii() and position.isdigit() and len(position) <= 20  # int() refuses past 4,300 digits
        record = await self.store.find(stream_id, key_name, int(position)) if readable else None
        if record is None or not record.holds_position(int(position)) or (record.finished and int(position) >= record.count):
            return await send_response(send, 204, b"", None, self.cors_headers(scope))
        await self.serve_reader(record, int(position), scope, receive, send)

    async def cancel_stream(self, stream_id: str, key_name: str | None, scope: Scope, send: Send) -> None:
        if not await self.store.cancel(stream_id, key_name):
            raise HTTPError(404, "not_found", "no running stream with this id")
        await send_response(send, 204, b"", None, self.cors_headers(scope))

    # --- the generation: provider chunks into the record

    async def generate(self, record: StreamRecord, provider: Provider, upstream: Upstream) -> None:
        outcome: Final | UpstreamError | None = None  # None: cancelled by record.cancel
        try:
            outcome = await self.drive(record, provider, upstream)
        except UpstreamError as exc:
            outcome = exc
        except anyio.get_cancelled_exc_class():
            outcome = UpstreamError("shutdown", "the server is shutting down")
            raise
        finally:
            self.conclude(record, outcome)
            with anyio.CancelScope(shield=True):
                await self.account(record)

    async def drive(self, record: StreamRecord, provider: Provider, upstream: Upstream) -> Final | None:
        """Run the provider under the deadlines; every failure becomes UpstreamError,
        and a stop by record.cancel returns None."""
        cfg = self.config
        start = anyio.current_time()
        total = start + cfg.total_timeout
        # One cancel scope for the three ways a generation stops early (record.cancel, the
        # first-token then idle deadline, the total deadline), told apart after: each nested
        # scope costs every upstream read, every cancel and every exit a walk of the nest.
        scope = record.generation = anyio.CancelScope(deadline=min(start + cfg.first_token_timeout, total))
        idle = IdleDeadline(scope, cfg.idle_timeout, cap=total)
        final: Final | None = None
        UPSTREAM_IDLE.set(idle)  # this task's own context: told of every upstream read
        try:
            with scope:
                if record.cancel_reason:  # cancelled before it started: the client left at once
                    scope.cancel()
                async with aclosing(retried(provider)(self.http, upstream, record.request)) as chunks:
                    async for chunk in chunks:
                        if record.cancel_reason is not None:  # a read ready at every loop turn never lets the cancel land: see Pace.gone
                            await anyio.lowlevel.checkpoint_if_cancelled()
                        if type(chunk) is str:
                            if not chunk:
                                continue
                            first = not record.tokens
                            if first:
                                idle.arm()
                                record.first_token_after = anyio.current_time() - start
                            record.tokens += 1
                            record.append("token", chunk)
                            if first:  # let the writer send it before we parse the rest of this read
                                await anyio.lowlevel.checkpoint()
                        elif isinstance(chunk, Final):
                            final = chunk
        except httpx.ConnectTimeout:
            raise UpstreamError("timeout", f"connect deadline: no connection within {cfg.connect_timeout:g} s") from None
        except httpx.TimeoutException as exc:
            raise UpstreamError("timeout", f"upstream {type(exc).__name__}") from None
        except (httpx.HTTPError, LineTooLong) as exc:
            raise UpstreamError("protocol_error", f"the upstream stream broke: {str(exc) or type(exc).__name__}") from None
        if scope.cancelled_caught:  # which of the three it was
            if isinstance(record.cancel_reason, UpstreamError):
                raise record.cancel_reason
            if record.cancel_reason is not None:
                return None
            if anyio.current_time() >= total:
                raise UpstreamError("timeout", f"total deadline: the generation ran past {cfg.total_timeout:g} s")
            if record.tokens:
                raise UpstreamError("timeout", f"idle deadline: the upstream sent nothing for {cfg.idle_timeout:g} s")
            raise UpstreamError("timeout", f"first-token deadline: no token within {cfg.first_token_timeout:g} s")
        if final is None:
            raise UpstreamError("protocol_error", "the upstream stream ended without a final chunk")
        return final

    def conclude(self, record: StreamRecord, outcome: Final | UpstreamError | None) -> None:
        """Write usage?, error?, done (once) and free the stream's slot."""
        if record.finished:
            return
        if isinstance(outcome, Final):
            reason, usage, error = outcome.finish_reason, outcome.usage, None
        elif isinstance(outcome, UpstreamError):
            reason, usage, error = "error", outcome.usage, outcome
            error.message = self.redact(error.message)
            error.upstream_type = error.upstream_type and self.redact(error.upstream_type)
            error.code = self.redact(error.code) if isinstance(error.code, str) else error.code
        else:
            reason, usage, error = "cancelled", None, None
        if usage is None and record.tokens:
            usage = estimate_usage(record)
        record.finish(reason, usage, error)
        self.release(record.key_name)
        self.store.finished(record)

    def redact(self, text: str) -> str:
        """Upstreams sometimes echo the key they were given; never pass it on."""
        for upstream in self.config.upstreams.values():
            if upstream.api_key and upstream.api_key in text:
                text = text.replace(upstream.api_key, "[redacted]")
        return text

    async def account(self, record: StreamRecord) -> None:
        """After done: metrics, the log line and the ledger row."""
        facts = stream_facts(record, anyio.current_time())
        metrics, backend = self.metrics, record.request.backend
        metrics.streams[backend, record.finish_reason or "error"] += 1
        metrics.tokens[backend] += record.tokens
        if record.error is not None:
            metrics.upstream_errors[record.error.type] += 1
        if record.first_token_after is not None:
            metrics.time_to_first_token.observe(record.first_token_after)
        metrics.stream_duration.observe(facts["duration_ms"] / 1000)
        self.registry.expire_later(record)
        log.info(orjson.dumps({"event": "stream_end", **facts}).decode())
        try:
            if self.ledger is not None:
                await self.ledger.add(facts)  # only queues it: the ledger's thread writes it
        finally:
            self.unaccounted -= 1

    async def linger(self, record: StreamRecord) -> None:
        """While the generation runs without a reader, wait the resume grace
        for one to come back; then cancel it (and its upstream request)."""
        grace, readers = self.config.resume_grace, self.store.readers  # readers on every replica
        while not record.finished:
            if readers(record):
                await record.wait()
                continue
            deadline = anyio.current_time() + grace
            while not readers(record) and not record.finished and anyio.current_time() < deadline:  # grace 0: no wait at all
                with anyio.move_on_after(deadline - anyio.current_time()):
                    await record.wait()
            if not readers(record):
                record.cancel("client gone")
                return

    # --- the writer: record to client

    async def serve_reader(
        self, record: StreamRecord, position: int, scope: Scope, receive: Receive, send: Send, opening: bytes = FIRST_CHUNK
    ) -> None:
        headers = [*SSE_HEADERS, (b"x-stream-id", record.id.encode()), *self.cors_headers(scope)]
        record.readers += 1
        record.notify()
        cursor = [position]
        pace = Pace(loop_clock())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": opening, "more_body": True})
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self.watch_reader, receive, tasks.cancel_scope, record, pace)
                try:
                    await self.write_events(record, cursor, send, pace)
                except OSError:  # as below; caught here, or the task group wraps it in an ExceptionGroup
                    record.ever_disconnected = True
                tasks.cancel_scope.cancel()
        except OSError:  # ASGI 2.4 servers raise it on a send to a gone client
            record.ever_disconnected = True
        except anyio.get_cancelled_exc_class():
            # Server shutdown: no server sends http.disconnect, cancellation is
            # the only signal. Tell the client why, briefly, then let go.
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                self.conclude(record, UpstreamError("shutdown", "the server is shutting down"))
                rest = record.read(cursor[0])
                if rest:
                    await send({"type": "http.response.body", "body": rest, "more_body": False})
            raise
        finally:
            record.readers -= 1
            record.notify()

    async def write_events(self, record: StreamRecord, cursor: list[int], send: Send, pace: Pace) -> None:
        """Send everything pending in one body message per wake-up, heartbeat
        when silent, then close the response (unless the client fell behind the
        held events). No timer per token: watch_reader keeps time for all sends."""
        more_body = True
        while more_body and not pace.gone:
            pending = record.read(cursor[0])
            if pending is None:
                return
            if pending:
                cursor[0] = record.count
            elif record.finished:
                more_body = False  # the closing chunk: watched like any send, a stalled client may block here
            elif pace.beat:
                pending = HEARTBEAT
            else:
                await record.wait()
                continue
            pace.last_write, pace.sending, pace.beat = pace.clock(), True, False
            await send({"type": "http.response.body", "body": pending, "more_body": more_body})
            pace.sending = False

    async def watch_reader(self, receive: Receive, writer: anyio.CancelScope, record: StreamRecord, pace: Pace) -> None:
        """Stop the writer when the client leaves or takes no bytes for the
        send timeout; wake it when a heartbeat is due. One timer per silence
        here replaces two timed cancel scopes per token in the writer."""
        cfg, woke = self.config, -math.inf
        while True:
            started, sending, now = pace.last_write, pace.sending, anyio.current_time()
            beat, stalled = max(started, woke) + cfg.heartbeat, started + cfg.send_timeout
            # look again by then: a send may start (when idle) or end (while sending) meanwhile
            due = min(stalled, now + cfg.heartbeat) if sending else min(beat, now + cfg.send_timeout)
            with anyio.CancelScope(deadline=due) as timer:
                if (await receive())["type"] == "http.disconnect":
                    record.ever_disconnected = pace.gone = True
                    if not cfg.resume_grace and self.store.readers(record) == 1:  # the last reader anywhere left: stop the upstream now
                        record.cancel("client gone")
                        if record.generation is not None and not pace.sending:
                            # The writer is parked in record.wait(): the generation's done wakes it and it stops
                            # on pace.gone. Cancelling it too would unwind it in the generation's loop turn, ahead
                            # of the upstream close: when 20 clients leave at once, that was half of the wait for
                            # the last close (bench/cancel-path.md).
                            return
                    return writer.cancel()
            if not timer.cancelled_caught or (pace.last_write, pace.sending) != (started, sending):
                continue
            if sending and due >= stalled:  # the same send is still blocked: the client stopped reading
                pace.gone = True
                return writer.cancel()
            if not sending and due >= beat:
                woke, pace.beat = anyio.current_time(), True
                record.notify()  # the writer sends the heartbeat


class Pace:
    """When a reader's writer last started a send, whether it is still in it,
    whether a heartbeat is due, and whether the client is gone.

    `gone` stops the writer at its next wake-up even if the watcher's cancel
    has not landed: anyio (on asyncio) cancels a task only while it waits on
    something not yet done, and a writer woken by a token at every loop turn
    never is one; it then wrote on for nobody as long as tokens came."""

    __slots__ = ("beat", "clock", "gone", "last_write", "sending")

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock  # anyio's clock, looked up once: the writer reads it at every send
        self.last_write, self.sending, self.beat, self.gone = clock(), False, False, False


def _last_event_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name.lower() == b"last-event-id" and value.strip():
            return str(value.decode("utf-8", "replace").strip())  # browsers send UTF-8
    return None


async def send_response(
    send: Send, status: int, body: bytes, content_type: bytes | None, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    head = [*(headers or [])] if status == 204 else [(b"content-length", str(len(body)).encode()), *(headers or [])]
    if content_type is not None:
        head.append((b"content-type", content_type))
    if status >= 400:
        head.append((b"cache-control", b"no-store"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


app = Gateway()


# --- command line ----------------------------------------------------------------


def main(argv: list[str]) -> int:
    """`python -m asgi_stream` serves; `python -m asgi_stream usage` sums the ledger."""
    try:
        config = load_config(os.environ)
        port = int(_number(os.environ, "PORT", 8000, 1))
    except ConfigError as exc:
        print(f"asgi-stream: {exc}", file=sys.stderr)
        return 2
    if argv[1:2] == ["usage"]:
        return usage_report(argv[2:], config.usage_db)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host = os.environ.get("HOST", "127.0.0.1")
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=5, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
