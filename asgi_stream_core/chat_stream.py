"""The gateway's own front door, `/chat/stream`: start a stream (a
generation and its first reader), resume one from `Last-Event-ID`, cancel
one with DELETE. Its events are SSE with ids (docs/design.md)."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable

import anyio

from asgi_stream_core.chat_request import parse_chat_request
from asgi_stream_core.generation import generation_for
from asgi_stream_core.reader import Reader
from asgi_stream_core.record import StreamRecord
from asgi_stream_core.services import Services
from asgi_stream_core.types import RETRY_SOON, Refusal
from asgi_stream_core.web import Exchange, cors_headers, read_body, require_json, send_response
from providers import ChatRequest


def chat_stream(services: Services, exchange: Exchange) -> Awaitable[None]:
    """GET or POST: a resume when the request carries a Last-Event-ID, else a new stream.
    Not a coroutine of its own but the one it chose: no frame of ours held all stream long (320 B)."""
    last_event_id = next((v for k, v in exchange.scope["headers"] if k.lower() == b"last-event-id" and v.strip()), None)
    if last_event_id is not None:
        return resume_stream(services, exchange, last_event_id.decode("utf-8", "replace").strip())  # browsers send UTF-8
    return start_stream(services, exchange)


async def start_stream(services: Services, exchange: Exchange) -> None:
    cfg = services.config
    request = await read_chat_request(services, exchange)
    exchange = exchange.parsed()  # this frame lives as long as the stream: the header dict is let go
    record = StreamRecord(secrets.token_urlsafe(16), exchange.key_name, request, cfg.stream_buffer_bytes)
    await services.admission.hold(record)
    generation = generation_for(services, record)
    # Spawned tasks always run to their first checkpoint (even when cancelled at
    # once), and the generation takes ownership of the stream's ending before that.
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(generation.run)
        reader = Reader(services, record, 0)
        await reader.serve(exchange.receive, exchange.send, record.opening, cors_headers(cfg, exchange.scope))
        await generation.linger()


async def read_chat_request(services: Services, exchange: Exchange) -> ChatRequest:
    """The request, validated: the body of a POST, or the query of a GET. In a frame of its
    own, so that the raw body (a prompt's size) is not held beside it as long as the stream."""
    body = b""
    if exchange.method == "POST":
        require_json(exchange.headers)
        body = await read_body(exchange.receive, exchange.headers, services.config)
    return parse_chat_request(exchange.method, exchange.query, body, services.config)


async def resume_stream(services: Services, exchange: Exchange, last_event_id: str) -> None:
    """Replay what followed `last_event_id`, then follow the generation.
    Whatever cannot be resumed gets 204, which stops EventSource."""
    stream_id, _, position = last_event_id.rpartition(".")
    readable = position.isascii() and position.isdigit() and len(position) <= 20  # int() refuses past 4,300 digits
    record = await services.store.find(stream_id, exchange.key_name, int(position)) if readable else None
    cors = cors_headers(services.config, exchange.scope)
    if record is None or not record.holds_position(int(position)) or (record.finished and int(position) >= record.count):
        return await send_response(exchange.send, 204, b"", None, cors)
    limit = services.config.max_readers_per_stream
    if services.store.readers(record) >= limit:  # checked and counted with no await between: one reader past it, never two
        raise Refusal(429, "rate_limited", f"this stream is at its limit of {limit} readers", RETRY_SOON)
    exchange = exchange.parsed()  # this frame lives as long as the reader: the header dict is let go
    await Reader(services, record, int(position)).serve(exchange.receive, exchange.send, record.resumed_opening, cors)


async def cancel_stream(services: Services, exchange: Exchange) -> None:
    """DELETE /chat/stream/<stream>: stop it at once, whatever the resume grace."""
    stream_id = exchange.scope["path"].removeprefix("/chat/stream/")
    if not await services.store.cancel(stream_id, exchange.key_name):
        raise Refusal(404, "not_found", "no running stream with this id")
    await send_response(exchange.send, 204, b"", None, cors_headers(services.config, exchange.scope))
