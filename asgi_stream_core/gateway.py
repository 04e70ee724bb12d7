"""The ASGI application: the lifespan, and for each HTTP request the route,
the API key, CORS, and the refusal in the route's error shape. What a route
does is its handler's (routes.py); what every exchange shares is built once,
from the settings, at startup (services.py)."""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Mapping
from contextlib import AsyncExitStack
from urllib.parse import parse_qsl, urlencode

import anyio

from asgi_stream_core import access_log
from asgi_stream_core.collector import collecting
from asgi_stream_core.config import Config, ConfigError, load_config
from asgi_stream_core.metrics import Metrics
from asgi_stream_core.routes import Route, route_for
from asgi_stream_core.services import Services, build_services
from asgi_stream_core.types import ClientGone, Receive, Refusal, Scope, Send
from asgi_stream_core.web import Exchange, cors_headers, origin_allowed, read_body, require_json, send_response, without_body

log = logging.getLogger("asgi_stream")

# Server's graceful timeout + this must stay below the orchestrator's stop grace (docker-compose.yml).
LEDGER_SHUTDOWN_WAIT_SECONDS = 5.0
MAX_HEADER_BYTES = 65536


def attach_stream_log(level: int) -> None:
    """Servers other than `python -m asgi_stream` (uvicorn's CLI among them)
    configure only their own loggers, so our INFO line would be dropped: give
    ours a stderr handler, unless the host set up logging (no line twice)."""
    log.setLevel(level)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


class Gateway:
    """The ASGI application. Settings are read once, at lifespan startup or,
    under servers without lifespan (daphne), at the first request."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        self._environ = environ
        self.metrics = Metrics()
        self.services: Services | None = None  # built by start()
        access_log.install()  # the server's access log without queries (prompts, keys), whatever started it

    def start(self) -> Services:
        """Read the settings and build what every exchange shares (once)."""
        if self.services is None:
            config = load_config(os.environ if self._environ is None else self._environ)
            attach_stream_log(config.log_level)
            self.services = build_services(config, self.metrics)
        return self.services

    async def aclose(self) -> None:
        services = self.services
        if services is None:
            return
        # Servers cancel open streams before the lifespan shutdown but do not
        # wait for them: give their last ledger rows time to be written.
        with anyio.move_on_after(LEDGER_SHUTDOWN_WAIT_SECONDS):
            while services.admission.unaccounted:  # noqa: ASYNC110 - a rare, bounded wait at shutdown
                await anyio.sleep(0.01)
        await services.http.aclose()
        if services.ledger is not None:
            await anyio.to_thread.run_sync(services.ledger.close)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            route = route_for(scope["path"])
            if scope["method"] == "HEAD":  # refusals included: a HEAD answer never has a body
                send = without_body(send)
            try:
                await (await self.handling(route, scope, receive, send))
            except Refusal as refusal:
                self.metrics.rejected[refusal.type] += 1
                config = self.services.config if self.services is not None else None
                headers = refusal.headers + cors_headers(config, scope)
                await send_response(send, refusal.status, route.error_body(refusal), b"application/json", headers)
            except ClientGone:
                pass

    async def lifespan(self, receive: Receive, send: Send) -> None:
        async with AsyncExitStack() as running:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        services = self.start()
                        await running.enter_async_context(services.store.running())
                        cfg = services.config
                        await running.enter_async_context(collecting(cfg.gc_threshold, cfg.gc_interval, services.metrics.active_streams))
                    except (ConfigError, Refusal) as exc:
                        await send({"type": "lifespan.startup.failed", "message": f"asgi-stream: {exc}"})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.aclose()
                    await running.aclose()  # a shared store writes the streams' last events first
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def handling(self, route: Route, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The checks every route shares, and the body read when the route says so; then the
        handler's coroutine, awaited by the caller: not in this frame, whose locals (the body among
        them, a prompt's size) would otherwise be held as long as a stream (bench/stream_memory.py)."""
        path, method = scope["path"], scope["method"]
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        if "access_token" in query:  # other servers' access logs print this scope's query: keep the key out, whatever the status
            scope["query_string"] = urlencode({**query, "access_token": "[redacted]"}).encode()
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:  # servers' own limits vary (httptools: none)
            raise Refusal(431, "invalid_request", f"the request headers are larger than {MAX_HEADER_BYTES} bytes")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not route.methods:
            raise Refusal(404, "not_found", f"no route for {path[:100]}")
        if method == "OPTIONS":
            return self.preflight(route, headers, send)
        if method not in route.methods:
            allow = ", ".join(route.methods)
            raise Refusal(405, "method_not_allowed", f"{path[:100]} allows {allow}", [(b"allow", allow.encode())])
        services = self.start()  # without lifespan (daphne): bad settings fail the first request, /healthz included
        key_name = self.authenticate(services.config, headers, query) if route.needs_key else None
        body = b""
        if route.json_body:
            if method == "POST":
                require_json(headers)
            body = await read_body(receive, headers, services.config)
        assert route.handler is not None
        return route.handler(services, Exchange(scope, receive, send, headers, query, key_name, body))

    @staticmethod
    def authenticate(config: Config, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """The API key's name; None when no keys are configured (open)."""
        keys = config.api_keys
        if not keys:
            return None
        auth = headers.get("authorization", "")
        offered = auth[7:].strip() if auth[:7].lower() == "bearer " else query.get("access_token", "")
        offered = offered or headers.get("x-api-key", "").strip()  # Anthropic's SDKs send the key so (bearer: ANTHROPIC_AUTH_TOKEN)
        name = None
        for key, key_name in keys.items():  # compare with every key, in constant time
            if hmac.compare_digest(key.encode(), offered.encode("utf-8", "replace")):
                name = key_name
        if not offered or name is None:
            message = "a valid API key is required: Authorization: Bearer <key> (or x-api-key: <key>)"
            raise Refusal(401, "unauthorized", message, [(b"www-authenticate", b"Bearer")])
        return name

    async def preflight(self, route: Route, headers: Mapping[str, str], send: Send) -> None:
        config, origin = self.start().config, headers.get("origin")
        if origin is None or not origin_allowed(config, origin):
            raise Refusal(403, "forbidden", "this origin is not allowed (CORS_ORIGINS)")
        await send_response(send, 204, b"", None, [
            (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
            (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
            (b"access-control-allow-headers", route.preflight_headers(headers)),
            (b"access-control-max-age", b"600"),
        ])  # fmt: skip
