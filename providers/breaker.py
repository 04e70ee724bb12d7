"""A circuit breaker per upstream, for the targets of model aliases: an
upstream whose attempts keep failing retryably is skipped (the chain moves on
at once) for COOL_DOWN seconds, then one request probes it; its first chunk
closes the circuit again, a failure opens it for another cool-down. State per
process."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

import httpx
import orjson

from providers import CIRCUIT_OPEN, ChatRequest, Chunk, Provider, Upstream, UpstreamError

log = logging.getLogger("asgi_stream")

FAILURES_TO_OPEN = 5  # consecutive retryable failures before the first output
COOL_DOWN = 30.0


class CircuitBreaker:
    def __init__(self, upstream: str, failures_to_open: int = FAILURES_TO_OPEN, cool_down: float = COOL_DOWN):
        self.upstream, self.failures_to_open, self.cool_down = upstream, failures_to_open, cool_down
        self.failures = 0
        self.open_until: float | None = None  # None: closed
        self.probing = False  # half open: one request is finding out

    @property
    def state(self) -> str:
        if self.open_until is None:
            return "closed"
        return "half_open" if self.probing or time.monotonic() >= self.open_until else "open"

    def admits(self) -> bool:
        """Whether a request may try the upstream now; after the cool-down, the first one
        is the probe and the others keep skipping it until the probe is answered."""
        if self.open_until is None:
            return True
        if self.probing or time.monotonic() < self.open_until:
            return False
        self.probing = True
        return True

    def succeeded(self) -> None:
        if self.open_until is not None:
            log.info(orjson.dumps({"event": "circuit_closed", "upstream": self.upstream}).decode())
        self.failures, self.open_until, self.probing = 0, None, False

    def failed(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.failures_to_open:
            self.open_until, self.probing = time.monotonic() + self.cool_down, False
            log.warning(orjson.dumps({"event": "circuit_open", "upstream": self.upstream, "failures": self.failures,
                                      "cool_down_seconds": self.cool_down}).decode())  # fmt: skip

    def abandoned(self) -> None:
        """An admitted request ended before its answer (a cancel): a probe's turn passes on."""
        self.probing = False


def guarded(provider: Provider, breaker: CircuitBreaker) -> Provider:
    """`provider` behind `breaker`: refused at once (retryably) while the circuit is open;
    its answer before the first chunk is the breaker's evidence. A failure that is not
    retryable (a 400 for this request) says the upstream is up."""

    async def stream(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
        if not breaker.admits():
            message = f"{breaker.upstream} is skipped for now: its attempts kept failing (circuit open)"
            raise UpstreamError("upstream_unavailable", message, code=CIRCUIT_OPEN, retryable=True)
        answered = False
        try:
            async with aclosing(provider(http, upstream, request)) as chunks:
                async for chunk in chunks:
                    if not answered:
                        answered = True
                        breaker.succeeded()
                    yield chunk
        except UpstreamError as exc:
            if not answered:
                answered = True
                if exc.retryable:
                    breaker.failed()
                else:
                    breaker.succeeded()
            raise
        finally:
            if not answered:
                breaker.abandoned()

    return stream
