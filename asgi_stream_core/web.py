"""The I/O of one HTTP exchange that every route shares: reading the body
under its limits, the one check of a JSON media type, the one CORS origin
check, and the one writer of a whole (non-streaming) response."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import anyio

from asgi_stream_core.config import Config
from asgi_stream_core.types import ClientGone, Headers, Message, Receive, Refusal, Scope, Send

SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def header(scope: Scope, name: bytes) -> str | None:
    """A request header's value (the first of its name), or None."""
    return next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == name), None)


def is_json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def require_json(headers: Mapping[str, str]) -> None:
    """The one 415 check: a POST body must be JSON (parameters such as charset allowed)."""
    if not is_json_media_type(headers.get("content-type", "")):
        raise Refusal(415, "unsupported_media_type", "POST bodies must be application/json")


async def read_body(receive: Receive, headers: Mapping[str, str], config: Config) -> bytes:
    """The request body, read piece by piece and refused at the limit."""
    limit = config.max_body_bytes
    too_large = Refusal(413, "payload_too_large", f"the request body is larger than {limit} bytes")
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
    raise Refusal(408, "request_timeout", f"the request body did not arrive within {config.body_timeout:g} s")


def origin_allowed(config: Config | None, origin: str | None) -> bool:
    """`*` allows every real origin, not `null`: that is what sandboxed frames and
    file: pages send, so any page can claim it. Listed by name, it is allowed."""
    origins = config.cors_origins if config is not None else frozenset()
    if not origins or origin is None:
        return False
    return origin in origins or ("*" in origins and origin.lower() != "null")


def cors_headers(config: Config | None, scope: Scope) -> Headers:
    """What a response to an allowed origin carries (nothing for any other)."""
    origin = header(scope, b"origin")
    if origin is None or not origin_allowed(config, origin):
        return []
    allow = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
    return [*allow, (b"access-control-expose-headers", b"X-Stream-ID")]


async def send_response(send: Send, status: int, body: bytes, content_type: bytes | None, headers: Headers | None = None) -> None:
    """A whole response; a refusal is never cached."""
    head = [] if content_type is None else [(b"content-type", content_type)]
    if status != 204:
        head.append((b"content-length", str(len(body)).encode()))
    head += headers or []
    if status >= 400:
        head.append((b"cache-control", b"no-store"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def without_body(send: Send) -> Send:
    """`send` for a HEAD request: every message as GET's, its headers too, but no body bytes."""

    async def send_head(message: Message) -> None:
        await send({**message, "body": b""} if message["type"] == "http.response.body" else message)

    return send_head


@dataclass(frozen=True, slots=True)
class Exchange:
    """One authenticated request as a route's handler gets it."""

    scope: Scope
    receive: Receive
    send: Send
    headers: dict[str, str]  # lower-cased names; the last of a repeated name
    query: dict[str, str]
    key_name: str | None  # the API key's name; None when the gateway is open
    body: bytes  # read (and checked as JSON) before the handler when its route says so

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    def parsed(self) -> Exchange:
        """This exchange without what only reading the request needs, for a handler that
        has read it: its body and its header dict are then not held for as long as the
        stream (the body, a prompt's size, beside the parsed request: bench/stream_memory.py
        --prompt-bytes; the header dict, 425 B of a bare request). The scope keeps the headers."""
        return Exchange(self.scope, self.receive, self.send, {}, self.query, self.key_name, b"")  # dataclasses.replace: twice the time
