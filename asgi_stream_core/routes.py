"""The routing table: each path (or path prefix) with the methods it takes,
its handler, whether it needs an API key, whether its body is read as JSON
before the handler, and the error shape it answers refusals in. A new front
door is a module of handlers and rows here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from asgi_stream_core import anthropic_api, openai_api, responses_api
from asgi_stream_core.chat_stream import cancel_stream, chat_stream
from asgi_stream_core.services import Services
from asgi_stream_core.types import Refusal
from asgi_stream_core.web import Exchange, send_response

Handler = Callable[[Services, Exchange], Awaitable[None]]
OUR_PREFLIGHT_HEADERS = b"Authorization, Content-Type, Last-Event-ID"


def our_error_body(refusal: Refusal) -> bytes:
    return orjson.dumps({"error": {"type": refusal.type, "message": refusal.message}})


def our_preflight_headers(headers: Mapping[str, str]) -> bytes:
    return OUR_PREFLIGHT_HEADERS


@dataclass(frozen=True, slots=True)
class Route:
    methods: tuple[str, ...]  # () for a prefix that only sets the error shape of what is not found under it
    handler: Handler | None = None
    needs_key: bool = True
    json_body: bool = False  # a POST's body is checked as JSON (415) and read (413, 408) before the handler
    error_body: Callable[[Refusal], bytes] = our_error_body
    preflight_headers: Callable[[Mapping[str, str]], bytes] = our_preflight_headers


async def index_page(services: Services, exchange: Exchange) -> None:
    await send_response(exchange.send, 200, services.index_page, b"text/html; charset=utf-8")


async def health(services: Services, exchange: Exchange) -> None:
    body = orjson.dumps({"status": "ok", **services.store.health(), **upstream_health(services)})
    await send_response(exchange.send, 200, body, b"application/json")


def upstream_health(services: Services) -> dict[str, Any]:
    """With CONFIG_FILE: each key pool's keys in service, and the circuits not closed (none: nothing is added)."""
    health: dict[str, Any] = {}
    if services.key_pools:
        health["keys_in_service"] = {name: pool.in_service() for name, pool in services.key_pools.items()}
    circuits = {name: breaker.state for name, breaker in services.breakers.items() if breaker.state != "closed"}
    if circuits:
        health["circuits"] = circuits
    return health


async def metrics(services: Services, exchange: Exchange) -> None:
    ledger = services.ledger.metrics() if services.ledger is not None else b""
    body = services.metrics.render(len(services.registry), services.key_pools) + ledger
    await send_response(exchange.send, 200, body, b"text/plain; version=0.0.4")


async def backends(services: Services, exchange: Exchange) -> None:
    """The backends this server can serve, each with the model a request naming none gets,
    and the model aliases (`model=<alias>`), each with its targets in order."""
    cfg = services.config
    listed = [{"name": name, "default_model": cfg.model_for(name)} for name in cfg.upstreams]
    aliases = [{"name": name, "targets": [str(t) for t in targets]} for name, targets in cfg.routing.aliases.items()]
    body = orjson.dumps({"default_backend": cfg.default_backend, "backends": listed, **({"aliases": aliases} if aliases else {})})
    await send_response(exchange.send, 200, body, b"application/json")


# HEAD answers as GET would, without the body (gateway.py drops it; load balancers check
# health with HEAD), on every GET route but /chat/stream: its GET starts a generation.
ROUTES: dict[str, Route] = {
    "/": Route(("GET", "HEAD"), index_page, needs_key=False),
    "/healthz": Route(("GET", "HEAD"), health, needs_key=False),
    "/metrics": Route(("GET", "HEAD"), metrics),
    "/backends": Route(("GET", "HEAD"), backends),
    "/chat/stream": Route(("GET", "POST"), chat_stream),  # the body is read only to start a stream, not to resume
    "/v1/chat/completions": Route(("POST",), openai_api.chat_completions, json_body=True, error_body=openai_api.error_body,
                                   preflight_headers=openai_api.allowed_headers),
    "/v1/models": Route(("GET", "HEAD"), openai_api.list_models, json_body=True, error_body=openai_api.error_body,
                                   preflight_headers=openai_api.allowed_headers),
    "/v1/responses": Route(("POST",), responses_api.create_response, json_body=True, error_body=openai_api.error_body,
                           preflight_headers=openai_api.allowed_headers),
    "/v1/messages": Route(("POST",), anthropic_api.messages, json_body=True, error_body=anthropic_api.error_body,
                          preflight_headers=openai_api.allowed_headers),  # the SDKs' own headers: anthropic-version, x-api-key, ...
    "/v1/messages/count_tokens": Route(("POST",), anthropic_api.count_tokens, json_body=True, error_body=anthropic_api.error_body,
                                        preflight_headers=openai_api.allowed_headers),
}
PREFIXES: dict[str, Route] = {
    "/chat/stream/": Route(("DELETE",), cancel_stream),
    "/v1/": Route((), error_body=openai_api.error_body, preflight_headers=openai_api.allowed_headers),
}
NOT_FOUND = Route(())


def route_for(path: str) -> Route:
    """The route of `path`: its row, else its prefix's, else one that has no methods."""
    exact = ROUTES.get(path)
    if exact is not None:
        return exact
    return next((route for prefix, route in PREFIXES.items() if path.startswith(prefix)), NOT_FOUND)
