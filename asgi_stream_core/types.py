"""The types every room shares, importing nothing of the project: the ASGI
aliases (as starlette's `types.py` has them), the one refusal a request can
meet before any stream starts, and the one way a refusal shows a value."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

RETRY_SOON: Headers = [(b"retry-after", b"1")]


class Refusal(Exception):
    """A request refused before any stream starts: the HTTP status, our error
    type, the message, extra response headers, and the request field at fault
    (OpenAI's `param`; None when it is the request as a whole). Each front
    door writes it in its own error shape."""

    def __init__(self, status: int, type: str, message: str, headers: Headers | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers, self.param = status, type, message, headers or [], param


def invalid(message: str, param: str | None = None) -> Refusal:
    return Refusal(400, "invalid_request", message, param=param)


def unsupported(message: str, param: str) -> Refusal:
    """A field a front door or a backend cannot honour (never dropped silently)."""
    return Refusal(400, "unsupported_parameter", message, param=param)


def store_unavailable(message: str = "the shared stream store (Redis) is unreachable; try again shortly") -> Refusal:
    """The shared store (Redis) cannot be asked: limits cannot be enforced, so fail closed."""
    return Refusal(503, "store_unavailable", message, RETRY_SOON)


class ClientGone(Exception):
    """The client left before its request was complete."""


def shown(value: Any) -> str:
    """A client's value inside a refusal's message: as JSON, cut to 40 characters."""
    try:
        text = orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
