"""The generation: one stream's upstream call. It runs the provider under
the deadlines, appends what it yields to the stream record, writes the
ending exactly once, frees the slot at `done`, and accounts for the stream
(metrics, the log line, the ledger row). It outlives a client that left for
the resume grace, then stops, and with it the upstream request."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from contextlib import aclosing
from typing import Any

import anyio
import httpx
import orjson

from asgi_stream_core.metrics import estimated_usage, prompt_chars, stream_facts
from asgi_stream_core.record import StreamRecord
from asgi_stream_core.services import Services
from asgi_stream_core.turn import Turn
from providers import (
    SERVED,
    Attempt,
    Final,
    Provider,
    Reasoning,
    ToolCallDelta,
    Upstream,
    UpstreamError,
    fallback,
    retried,
)
from providers.breaker import guarded
from providers.idle import UPSTREAM_IDLE, IdleDeadline
from providers.lines import LineTooLong
from providers.pools import pooled

log = logging.getLogger("asgi_stream")

SHUTDOWN = UpstreamError("shutdown", "the server is shutting down")
CUT = Final("length")  # the usage is then estimated from the tokens it holds


class Generation:
    """`provider` is the request's whole plan: a backend with its retries, or an alias's chain."""

    __slots__ = ("provider", "record", "services", "turn", "upstream")  # one per open stream

    def __init__(self, services: Services, record: StreamRecord, provider: Provider, upstream: Upstream):
        self.services, self.record, self.provider, self.upstream = services, record, provider, upstream
        # Reasoning and tool calls: the turn's message beside its text. Made at the first such
        # piece: most turns are text alone, and an open stream holds 180 B less without one.
        self.turn: Turn | None = None

    async def run(self) -> None:
        outcome: Final | UpstreamError | None = None  # None: cancelled by record.cancel
        try:
            outcome = await self.drive()
        except UpstreamError as exc:
            outcome = exc
        except anyio.get_cancelled_exc_class():
            outcome = SHUTDOWN
            raise
        finally:
            message = None
            if isinstance(outcome, Final):
                turn = Turn() if self.turn is None else self.turn  # a turn of text alone may still carry reasoning_details
                for event, data in turn.close():
                    self.record.append(event, data)
                message = turn.message(self.record.text, outcome.round_trip)
            try:
                conclude(self.services, self.record, outcome, message)
            except Exception:  # a bug of ours (a value orjson cannot write): the stream still ends, and is accounted
                log.exception("the ending of stream %s could not be written", self.record.id)
                conclude(self.services, self.record, UpstreamError("protocol_error", "the stream's ending could not be written"))
            with anyio.CancelScope(shield=True):
                await account(self.services, self.record)

    async def drive(self) -> Final | None:
        """Run the provider under the deadlines; every failure becomes UpstreamError,
        and a stop by record.cancel returns None."""
        cfg, record = self.services.config, self.record
        start = anyio.current_time()
        total = start + cfg.total_timeout
        # One cancel scope for the three ways a generation stops early (record.cancel, the
        # first-token then idle deadline, the total deadline), told apart after: each nested
        # scope costs every upstream read, every cancel and every exit a walk of the nest.
        scope = record.generation = anyio.CancelScope(deadline=min(start + cfg.first_token_timeout, total))
        idle = IdleDeadline(scope, cfg.idle_timeout, cap=total)
        final: Final | None = None
        # max_tokens by our count: a text token past it (or reasoning and tool-call pieces past it
        # again) cuts the stream `length`: the scope's cancel lands inside the upstream read and closes it
        limit = cut_at = record.request.max_tokens
        cut = False
        UPSTREAM_IDLE.set(idle)  # this task's own context: told of every upstream read
        try:
            with scope:
                if record.cancel_reason:  # cancelled before it started: the client left at once
                    scope.cancel()
                async with aclosing(self.provider(self.services.http, self.upstream, record.request)) as chunks:
                    async for chunk in chunks:
                        if record.cancel_reason is not None:  # a read ready at every loop turn never lets the cancel land
                            await anyio.lowlevel.checkpoint_if_cancelled()
                        if type(chunk) is str:
                            if not chunk:
                                continue
                            first = record.first_token_after is None
                            if first:
                                idle.arm()
                                record.first_token_after = anyio.current_time() - start
                            if record.tokens >= cut_at or record.cut:  # record.cut: past the bound of a record that drops nothing
                                cut = True
                                scope.cancel()
                                continue
                            record.tokens += 1
                            record.append("token", chunk)
                            if first:  # let the writer send it before we parse the rest of this read
                                await anyio.lowlevel.checkpoint()
                        elif isinstance(chunk, Final):
                            final = chunk
                        elif isinstance(chunk, Reasoning | ToolCallDelta):
                            pieces = record.tokens
                            self.append_piece(chunk, start, idle)
                            cut_at += record.tokens - pieces  # pieces do not count against the text's limit
                            if cut_at - limit > limit:  # but past it on their own they are cut too
                                cut = True
                                scope.cancel()
        except httpx.ConnectTimeout:
            raise UpstreamError("timeout", f"connect deadline: no connection within {cfg.connect_timeout:g} s") from None
        except httpx.TimeoutException as exc:
            raise UpstreamError("timeout", f"upstream {type(exc).__name__}") from None
        except (httpx.HTTPError, LineTooLong) as exc:
            raise UpstreamError("protocol_error", f"the upstream stream broke: {str(exc) or type(exc).__name__}") from None
        except UpstreamError:
            raise
        except Exception as exc:
            # A provider failing on bytes it did not expect is a bug of ours, but it is this stream's
            # error event (with its usage), not a response cut off: logged whole, for whoever mends it.
            log.exception("the %s provider failed reading the upstream stream", record.request.backend)
            raise UpstreamError("protocol_error", f"the upstream stream could not be read ({type(exc).__name__})") from None
        if scope.cancelled_caught:
            if cut or record.cut:  # past max_tokens, or past the bound of a record that drops nothing
                return CUT
            self.raise_for_early_stop(total)
            return None  # cancelled by record.cancel
        if final is None:
            raise UpstreamError("protocol_error", "the upstream stream ended without a final chunk")
        return final

    def append_piece(self, piece: Reasoning | ToolCallDelta, start: float, idle: IdleDeadline) -> None:
        """Reasoning and tool-call pieces, as the turn makes them events. They are
        output like tokens: the first one stops the first-token deadline."""
        record, turn = self.record, self.turn
        if turn is None:
            turn = self.turn = Turn()
        for event, data in turn.add(piece):
            if record.first_token_after is None:
                idle.arm()
                record.first_token_after = anyio.current_time() - start
            record.tokens += 1
            record.append(event, data)

    def raise_for_early_stop(self, total: float) -> None:
        """Which of the three stops it was: a deadline or a cancel with an error
        raise it; a plain cancel returns."""
        cfg, record = self.services.config, self.record
        if isinstance(record.cancel_reason, UpstreamError):
            raise record.cancel_reason
        if record.cancel_reason is not None:
            return
        if anyio.current_time() >= total:
            raise UpstreamError("timeout", f"total deadline: the generation ran past {cfg.total_timeout:g} s")
        if record.tokens:
            raise UpstreamError("timeout", f"idle deadline: the upstream sent nothing for {cfg.idle_timeout:g} s")
        raise UpstreamError("timeout", f"first-token deadline: no token within {cfg.first_token_timeout:g} s")

    async def linger(self) -> None:
        """While the generation runs without a reader, wait the resume grace
        for one to come back; then cancel it (and its upstream request)."""
        record = self.record
        grace, readers = self.services.config.resume_grace, self.services.store.readers  # readers on every replica
        while not record.finished:
            if readers(record):
                await record.wait_readers()
                continue
            deadline = anyio.current_time() + grace
            while not readers(record) and not record.finished and anyio.current_time() < deadline:  # grace 0: no wait
                with anyio.move_on_after(deadline - anyio.current_time()):
                    await record.wait_readers()
            if not readers(record):
                record.cancel("client gone")
                return


def generation_for(services: Services, record: StreamRecord) -> Generation:
    """The request's generation: a backend's provider with its retries, or, for an
    alias, one attempt per target in order (providers.fallback)."""
    cfg, backend = services.config, record.request.backend
    targets = cfg.routing.aliases.get(backend)
    if targets is None:
        return Generation(services, record, retried(provider_of(services, backend)), cfg.upstreams[backend])
    attempts = [Attempt(t.upstream, guarded(provider_of(services, t.upstream), services.breakers[t.upstream]),
                        cfg.upstreams[t.upstream], t.model, cfg.first_token_timeout_of(t.upstream)) for t in targets]  # fmt: skip
    chain = fallback(attempts, lambda attempt, outcome: count_attempt(services, record, attempt, outcome))
    return Generation(services, record, chain, NO_UPSTREAM)


def provider_of(services: Services, backend: str) -> Provider:
    """The backend's provider, taking a key from its pool for each request when it has one."""
    stream = services.config.backend(backend).stream
    pool = services.key_pools.get(backend)
    return stream if pool is None else pooled(stream, pool)


NO_UPSTREAM = Upstream("")  # what an alias's chain is given: each of its attempts carries its own


def count_attempt(services: Services, record: StreamRecord, attempt: Attempt, outcome: str) -> None:
    """One attempt of an alias's chain: counted per upstream and outcome; the one that
    serves is written down (the ledger, /v1's `model`) and told to the client as a
    `route` event, before its first output."""
    record.attempts += 1
    services.metrics.attempts[attempt.backend, outcome] += 1
    if outcome == SERVED:
        record.served = (attempt.backend, attempt.model)
        route = {"backend": attempt.backend, "model": attempt.model, "attempts": record.attempts}
        record.append("route", orjson.dumps(route).decode())


def conclude(services: Services, record: StreamRecord, outcome: Final | UpstreamError | None,
             message: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Write message?, usage?, error?, done (once) and free the stream's slot."""
    if record.finished:
        return
    if isinstance(outcome, Final):
        reason, usage, error = outcome.finish_reason, outcome.usage, None
    elif isinstance(outcome, UpstreamError):
        reason, usage, error = "error", outcome.usage, redacted(outcome, services)
    else:
        reason, usage, error = "cancelled", None, None
    if usage is None and record.tokens:
        usage = estimated_usage(prompt_chars(record.request.messages), record.tokens)
    record.finish(reason, usage, error, message)
    services.admission.release(record.key_name)
    services.store.finished(record)


REDACTION_DEPTH = 16  # a deeper JSON value in an upstream's error is not forwarded at all


@functools.cache  # one pattern per set of keys: the process holds one configuration
def secrets_pattern(keys: tuple[str, ...]) -> re.Pattern[str] | None:
    """Any of the keys, in any case; None when there are none."""
    return re.compile("|".join(map(re.escape, keys)), re.IGNORECASE) if keys else None


def redacted(error: UpstreamError, services: Services) -> UpstreamError:
    """The error without any provider key in it: upstreams sometimes echo the key they
    were given, in any case, anywhere in their JSON (a `code` may be an object)."""
    pattern = secrets_pattern(tuple(services.config.secrets))
    if pattern is None:
        return error

    def clean(value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return pattern.sub("[redacted]", value)
        if depth >= REDACTION_DEPTH and isinstance(value, dict | list):  # bounded: no RecursionError from a hostile body
            return "[redacted]"
        if isinstance(value, dict):
            return {clean(k, depth + 1): clean(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v, depth + 1) for v in value]
        return value

    return dataclasses.replace(error, message=clean(error.message), upstream_type=clean(error.upstream_type), code=clean(error.code))


async def account(services: Services, record: StreamRecord) -> None:
    """After done: metrics, the log line and the ledger row."""
    facts = stream_facts(record, anyio.current_time())
    services.metrics.count_finished(record, facts["duration_ms"] / 1000)
    services.registry.expire_later(record)
    log.info(orjson.dumps({"event": "stream_end", **facts}).decode())
    try:
        if services.ledger is not None:
            await services.ledger.add(facts)  # only queues it: the ledger's thread writes it
    finally:
        services.admission.unaccounted -= 1
