"""Configuration, read once from the environment, and the table of backends.
Below everything: it imports only the providers' data types (the layer under
every room), and an invalid value stops startup naming its variable."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import orjson

from asgi_stream_core.ledger import target_problem
from asgi_stream_core.routing import Routing, RoutingError, read_routing
from asgi_stream_core.types import invalid, unsupported
from providers import ChatRequest, Provider, Unsupported, Upstream, anthropic, echo, gemini, ollama, openai


@dataclass(frozen=True)
class Backend:
    stream: Provider
    default_model: str
    key_variable: str | None  # None: needs no key
    url_variable: str | None
    default_url: str
    model_pattern: re.Pattern[str] = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-:/@+]{0,255}")
    check: Callable[[ChatRequest], None] | None = None  # raises Unsupported for what it cannot honour

    @property
    def setting(self) -> str | None:
        """The variable that configures it (named when it is not configured)."""
        return self.key_variable or self.url_variable


BACKENDS: dict[str, Backend] = {
    "echo": Backend(echo.stream_echo, echo.DEFAULT_MODEL, None, None, "", check=echo.check),
    "openai": Backend(openai.stream_openai, openai.DEFAULT_MODEL, "OPENAI_API_KEY", "OPENAI_BASE_URL",
                      "https://api.openai.com/v1", check=openai.check),
    "anthropic": Backend(anthropic.stream_anthropic, anthropic.DEFAULT_MODEL, "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL",
                         "https://api.anthropic.com", check=anthropic.check),
    "ollama": Backend(ollama.stream_ollama, ollama.DEFAULT_MODEL, None, "OLLAMA_BASE_URL", "http://localhost:11434",
                      check=ollama.check),
    "gemini": Backend(gemini.stream_gemini, gemini.DEFAULT_MODEL, "GEMINI_API_KEY", "GEMINI_BASE_URL",
                      "https://generativelanguage.googleapis.com", re.compile(gemini.MODEL_PATTERN), gemini.check),
}  # fmt: skip
def check_request(request: ChatRequest, config: Config) -> ChatRequest:
    """The request, once its backend (through an alias: every target) says it
    can honour every field (else a 400 naming it), and once what is sent on as
    given can be written again: orjson reads JSON nested 1,024 levels deep but
    writes only 254, and the upstream request is written with it."""
    try:
        orjson.dumps((request.messages, request.tools, request.tool_choice, request.response_format))
    except orjson.JSONEncodeError:
        raise invalid("the request nests JSON deeper than 254 levels, which cannot be sent upstream") from None
    targets = config.routing.aliases.get(request.backend)
    asked = [replace(request, backend=t.upstream, model=t.model) for t in targets] if targets else [request]
    try:
        for each in asked:
            if (check := config.backend(each.backend).check) is not None:
                check(each)
    except Unsupported as refused:
        raise unsupported(refused.message, refused.field) from None
    return request


PREFERRED_DEFAULTS = ("openai", "anthropic", "gemini", "ollama", "echo")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
    "max_readers_per_stream": ("MAX_READERS_PER_STREAM", 100, 1),  # clients reading one stream at once; past it a resume gets 429
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
    "responses_ttl": ("RESPONSES_TTL_SECONDS", 3600.0, 0),  # /v1/responses keeps each stored response this long; 0: none
    "gc_threshold": ("GC_THRESHOLD", 10_000, 0),  # the collector's youngest threshold while serving; 0: Python's (collector.py)
    "gc_interval": ("GC_INTERVAL_SECONDS", 0.02, 0),  # the young collected this often too, the old by heap growth; 0: Python's schedule
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
    max_readers_per_stream: int
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
    responses_ttl: float
    gc_threshold: int
    gc_interval: float
    redis_url: str
    log_level: int = logging.INFO  # of the per-stream log line (LOG_LEVEL)
    routing: Routing = field(default_factory=Routing)  # CONFIG_FILE's named upstreams and aliases

    def backend(self, name: str) -> Backend:
        return backend_of(self.routing, name)

    @property
    def backend_names(self) -> list[str]:
        """Every backend a request may name, configured or not: the environment's, then the file's upstreams."""
        return [*BACKENDS, *self.routing.upstreams]

    def model_name(self, backend: str, model: str) -> str:
        """How a door shows a request's model: `<backend>/<model>`, or an alias by its name."""
        return backend if backend in self.routing.aliases else f"{backend}/{model}"

    @property
    def secrets(self) -> list[str]:
        """Every provider key this process holds (each of a pool's): what no error may show."""
        pooled = [value for named in self.routing.upstreams.values() for _, value in named.keys]
        return [key for key in (*(u.api_key for u in self.upstreams.values()), *pooled) if key]

    def first_token_timeout_of(self, upstream: str) -> float:
        """An alias target's own first-token deadline (its file entry's), within the request's."""
        named = self.routing.upstreams.get(upstream)
        return named.first_token_timeout if named and named.first_token_timeout else math.inf

    def model_for(self, backend: str) -> str:
        """The model a request to `backend` that names none gets: DEFAULT_MODEL
        for the default backend when set, else the backend's own default."""
        if backend == self.default_backend and self.default_model:
            return self.default_model
        named = self.routing.upstreams.get(backend)
        return named.default_model if named else BACKENDS[backend].default_model


def number(env: Mapping[str, str], name: str, default: float, low: float) -> float:
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
    numbers = {attr: number(env, *spec) for attr, spec in NUMBERS.items()}
    if not env.get("MAX_TOKENS", "").strip():  # the default never exceeds a lower limit
        numbers["max_tokens"] = min(numbers["max_tokens"], numbers["max_tokens_limit"])
    if numbers["max_tokens"] > numbers["max_tokens_limit"]:
        raise ConfigError(f"MAX_TOKENS={numbers['max_tokens']} is above MAX_TOKENS_LIMIT={numbers['max_tokens_limit']}")
    upstreams = configured_upstreams(env, numbers["echo_delay"])
    routing = routing_of(env, upstreams)
    upstreams.update({name: Upstream(named.base_url, named.keys[0][1] if named.keys else "")
                      for name, named in routing.upstreams.items()})  # fmt: skip
    level = env.get("LOG_LEVEL", "").strip().upper() or "INFO"
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL={env['LOG_LEVEL']!r} is not one of {', '.join(LOG_LEVELS)}")
    usage_db = env.get("USAGE_DB", "usage.db").strip()
    if problem := target_problem(usage_db):
        raise ConfigError(f"USAGE_DB {problem}")
    redis_url = env.get("REDIS_URL", "").strip()
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        scheme = redis_url.partition(":")[0][:20]
        raise ConfigError(f"REDIS_URL must start with redis://, rediss:// or unix:// (got {scheme!r}...)")
    origins = frozenset(o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip())
    default_model = env.get("DEFAULT_MODEL", "").strip() or None
    return Config(upstreams, default_backend(env, upstreams), default_model, api_keys(env), origins, usage_db,
                  **numbers, redis_url=redis_url, log_level=logging.getLevelName(level), routing=routing)  # type: ignore[arg-type]


def backend_of(routing: Routing, name: str) -> Backend:
    """The wire format's row of a backend: an environment backend's own, a named upstream's `format`."""
    named = routing.upstreams.get(name)
    return BACKENDS[named.format if named else name]


def routing_of(env: Mapping[str, str], upstreams: Mapping[str, Upstream]) -> Routing:
    """CONFIG_FILE's upstreams and aliases, each alias target's model checked by its wire format."""
    path = env.get("CONFIG_FILE", "").strip()
    if not path:
        return Routing()
    try:
        routing = read_routing(path, env, BACKENDS, upstreams)
    except RoutingError as exc:
        raise ConfigError(f"CONFIG_FILE {path}: {exc}") from None
    for alias, targets in routing.aliases.items():
        for target in targets:
            if not backend_of(routing, target.upstream).model_pattern.fullmatch(target.model):
                raise ConfigError(f"CONFIG_FILE {path}: [aliases] {alias}: {str(target)!r} is not a valid model name")
    return routing


def configured_upstreams(env: Mapping[str, str], echo_delay: float) -> dict[str, Upstream]:
    """Every backend whose key is set (Ollama: its URL), with where it is; echo always."""
    upstreams = {"echo": Upstream("", token_delay=echo_delay)}
    for name, backend in BACKENDS.items():
        key = env.get(backend.key_variable, "") if backend.key_variable else ""
        url = env.get(backend.url_variable, "") if backend.url_variable else ""
        if key or (url and backend.key_variable is None):
            base = url or backend.default_url
            if not base.startswith(("http://", "https://")):
                raise ConfigError(f"{backend.url_variable}={base!r} must start with http:// or https://")
            upstreams[name] = Upstream(base, key)
    return upstreams


def default_backend(env: Mapping[str, str], upstreams: Mapping[str, Upstream]) -> str:
    default = env.get("DEFAULT_BACKEND", "").strip()
    if default and default not in BACKENDS and default not in upstreams:
        raise ConfigError(f"DEFAULT_BACKEND={default!r} is not one of {', '.join(dict.fromkeys([*BACKENDS, *upstreams]))}")
    if default and default not in upstreams:
        raise ConfigError(f"DEFAULT_BACKEND={default!r} is not configured (its key is not set)")
    return default or next(name for name in PREFERRED_DEFAULTS if name in upstreams)


def api_keys(env: Mapping[str, str]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in env.get("API_KEYS", "").split(","))):
        name, colon, key = entry.partition(":")
        if not colon or not name or not key:
            raise ConfigError("API_KEYS must be name:key pairs separated by commas")
        keys[key] = name
    return keys
