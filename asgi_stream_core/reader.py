"""The reader: one client's response to a stream record. Its writer sends
every pending event in one body message per wake-up and a heartbeat when
silent; its watcher, a second task, hears the client leave (`http.disconnect`)
and keeps time for every send: the heartbeat and the send timeout. Where it
is in the record and how its sends go are this object's own fields."""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio

from asgi_stream_core.access_log import may_leave_response_unfinished
from asgi_stream_core.generation import SHUTDOWN, conclude
from asgi_stream_core.record import StreamRecord
from asgi_stream_core.services import Services
from asgi_stream_core.sse import HEARTBEAT
from asgi_stream_core.types import Headers, Receive, Send
from asgi_stream_core.web import SSE_HEADERS
from providers.idle import loop_clock


class Reader:
    """`gone` stops the writer at its next wake-up even if the watcher's cancel
    has not landed: anyio (on asyncio) cancels a task only while it waits on
    something not yet done, and a writer woken by a token at every loop turn
    never is one; it then wrote on for nobody as long as tokens came."""

    __slots__ = ("beat", "clock", "gone", "last_write", "position", "record", "sending", "services")

    def __init__(self, services: Services, record: StreamRecord, position: int):
        self.services, self.record, self.position = services, record, position
        self.clock = loop_clock()  # anyio's clock, looked up once: the writer reads it at every send
        self.last_write = self.clock()  # when the writer last started a send
        self.sending = False  # whether it is still in that send
        self.beat = False  # whether a heartbeat is due
        self.gone = False  # whether the client is gone

    async def serve(self, receive: Receive, send: Send, opening: Callable[[], bytes], cors: Headers,
                    streams: Callable[[], bool | None] | None = None) -> bool:  # fmt: skip
        """The response: its head and `opening()`, then the record's events. With
        `streams` (a door that answers a failure before any output with a status
        of its own), the head waits until it says True; False, and nothing is
        sent, for the door to answer. The wait is the writer's, under the watcher
        that serves the whole response: a watcher of its own before it (`until`)
        took a loop turn to stop, which the generation spent on the rest of its
        read: a 5-token answer's first token 0.4 ms later (bench/door_first_token.py).
        Returns whether the response was this stream."""
        record, head_sent = self.record, False
        may_leave_response_unfinished()  # a client dropped (stalled, fell behind): uvicorn logs it as INFO, not ERROR
        record.readers += 1
        record.readers_changed()  # O(1): only the resume grace and a replica's announcer wait on it, no other reader
        try:
            if streams is None:
                await self.send_head(send, opening(), cors)
                head_sent = True
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self.watch, receive, tasks.cancel_scope)
                try:
                    if streams is not None and await self.first_output(streams):
                        await self.send_head(send, opening(), cors)
                        head_sent = True
                    if head_sent:
                        await self.write(send)
                except OSError:  # as below; caught here, or the task group wraps it in an ExceptionGroup
                    record.ever_disconnected = True
                tasks.cancel_scope.cancel()
        except OSError:  # ASGI 2.4 servers raise it on a send to a gone client
            record.ever_disconnected = True
        except anyio.get_cancelled_exc_class():
            # Server shutdown: no server sends http.disconnect, cancellation is
            # the only signal. Tell the client why, briefly, then let go.
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                conclude(self.services, record, SHUTDOWN)
                rest = record.read(self.position)
                if rest and head_sent:
                    await send({"type": "http.response.body", "body": rest, "more_body": False})
            raise
        finally:
            record.readers -= 1
            record.readers_changed()
        return head_sent

    async def send_head(self, send: Send, opening: bytes, cors: Headers) -> None:
        # the header list built in the message, not held in a frame for as long as the stream (200 B)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*SSE_HEADERS, (b"x-stream-id", self.record.id.encode()), *cors]})  # fmt: skip
        await send({"type": "http.response.body", "body": opening, "more_body": True})

    async def first_output(self, streams: Callable[[], bool | None]) -> bool:
        """Until `streams()` decides (at the first output, or the end) or the client leaves: whether to stream."""
        while (decided := streams()) is None and not self.gone:
            await self.record.wait()
        return bool(decided) and not self.gone

    async def write(self, send: Send) -> None:
        """Send everything pending in one body message per wake-up, heartbeat
        when silent, then close the response (unless the client fell behind the
        held events). No timer per token: the watcher keeps time for all sends."""
        record, more_body = self.record, True
        while more_body and not self.gone:
            pending = record.read(self.position)
            if pending is None:
                return
            if pending:
                self.position = record.count
            elif record.finished:
                more_body = False  # the closing chunk: watched like any send, a stalled client may block here
            elif self.beat:
                pending = HEARTBEAT
            else:
                await record.wait()
                continue
            self.last_write, self.sending, self.beat = self.clock(), True, False
            await send({"type": "http.response.body", "body": pending, "more_body": more_body})
            self.sending = False

    async def watch(self, receive: Receive, writer: anyio.CancelScope) -> None:
        """Stop the writer when the client leaves or takes no bytes for the
        send timeout; wake it when a heartbeat is due. One timer per silence
        here replaces two timed cancel scopes per token in the writer."""
        cfg, record, woke = self.services.config, self.record, -math.inf
        while True:
            started, sending, now = self.last_write, self.sending, anyio.current_time()
            beat, stalled = max(started, woke) + cfg.heartbeat, started + cfg.send_timeout
            # look again by then: a send may start (when idle) or end (while sending) meanwhile
            due = min(stalled, now + cfg.heartbeat) if sending else min(beat, now + cfg.send_timeout)
            with anyio.CancelScope(deadline=due) as timer:
                if (await receive())["type"] == "http.disconnect":
                    record.ever_disconnected = self.gone = True
                    if not cfg.resume_grace and self.services.store.readers(record) == 1:  # the last reader anywhere left
                        record.cancel("client gone")  # stop the upstream now
                        if record.generation is not None and not self.sending:
                            # The writer is parked in record.wait(): the generation's done wakes it and it stops
                            # on `gone`. Cancelling it too would unwind it in the generation's loop turn, ahead
                            # of the upstream close: when 20 clients leave at once, that was half of the wait for
                            # the last close (bench/cancel-path.md).
                            return
                    return writer.cancel()
            if not timer.cancelled_caught or (self.last_write, self.sending) != (started, sending):
                continue
            if sending and due >= stalled:  # the same send is still blocked: the client stopped reading
                self.gone = True
                return writer.cancel()
            if not sending and due >= beat:
                woke, self.beat = anyio.current_time(), True
                record.notify()  # the writer sends the heartbeat
