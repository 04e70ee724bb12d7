"""The path from a client's disconnect to the upstream's close, in-process on
asyncio and trio: what happens, and in what order (never how fast: a loaded
machine is slow, but the order holds on any machine)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from asgi_stream import Gateway
from asgi_stream_core.reader import Reader
from tests.test_inprocess import ENV, TIMEOUT, Exchange, exchange, post_json
from tests.upstream import FakeUpstream, Reply

pytestmark = pytest.mark.anyio

LONG = {"MAX_TOKENS_LIMIT": "100000", "MAX_TOKENS": "100000"}
WORDS = " ".join(f"w{i}" for i in range(50_000))  # echo sends one a loop turn: far more than any test waits for


class WatchedExchange(Exchange):
    """An exchange that notes how many messages were sent when the app's
    receive() handed it http.disconnect."""

    sent_when_gone: int | None = None

    async def receive(self) -> dict[str, Any]:
        message = await super().receive()
        if message["type"] == "http.disconnect" and self.sent_when_gone is None:
            self.sent_when_gone = len(self.sent)
        return message


@asynccontextmanager
async def watched(app: Gateway, body: dict[str, Any]) -> AsyncIterator[WatchedExchange]:
    headers = [("content-type", "application/json")]
    async with exchange(app, "POST", "/chat/stream", headers=headers, pieces=post_json(body)["pieces"], kind=WatchedExchange) as ex:
        assert isinstance(ex, WatchedExchange)
        yield ex


async def leave_after_first_token(ex: Exchange) -> None:
    await ex.next()  # headers
    await ex.next_body()  # the first chunk
    assert (await ex.next_body()).startswith(b"event: token\n")
    ex.disconnect()
    with anyio.fail_after(TIMEOUT):
        await ex.done.wait()


@pytest.mark.parametrize("grace", ["0", "0.05"])
async def test_a_cancel_lands_while_a_token_arrives_every_loop_turn(grace: str) -> None:
    # anyio on asyncio delivers a cancel only to a task waiting on something not
    # yet done; the writer, woken by a token every turn, never was one, and
    # the stream ran to its end for nobody.
    app = Gateway({**ENV, **LONG, "RESUME_GRACE_SECONDS": grace})
    async with watched(app, {"messages": [{"role": "user", "content": WORDS}]}) as ex:
        await leave_after_first_token(ex)
    assert app.metrics.streams == {("echo", "cancelled"): 1}
    assert app.metrics.tokens["echo"] < 50_000
    await app.aclose()


async def test_no_token_is_sent_after_the_app_received_http_disconnect() -> None:
    app = Gateway({**ENV, **LONG})
    async with watched(app, {"messages": [{"role": "user", "content": WORDS}]}) as ex:
        await leave_after_first_token(ex)
    assert ex.sent_when_gone is not None
    late = [m for m in ex.sent[ex.sent_when_gone :] if b"event: token" in m.get("body", b"")]
    assert late == []
    await app.aclose()


async def test_with_no_grace_the_disconnect_itself_cancels_before_the_reader_unwinds(monkeypatch: pytest.MonkeyPatch) -> None:
    app = Gateway({**ENV, **LONG})
    order: list[str] = []
    serve = Reader.serve

    async def noted_reader(reader: Reader, *args: Any) -> None:
        try:
            await serve(reader, *args)
        finally:
            order.append(f"reader gone, record cancelled: {reader.record.cancel_reason is not None}")

    monkeypatch.setattr(Reader, "serve", noted_reader)
    async with watched(app, {"messages": [{"role": "user", "content": WORDS}]}) as ex:
        await leave_after_first_token(ex)
    assert order == ["reader gone, record cancelled: True"]
    await app.aclose()


class NotingTransport(httpx.AsyncBaseTransport):
    """The real transport, noting in `order` when an upstream response is closed."""

    def __init__(self, order: list[str]):
        self.order, self.inner = order, httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        stream, order = response.stream, self.order
        assert isinstance(stream, httpx.AsyncByteStream)

        class Noted(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for piece in stream:
                    yield piece

            async def aclose(self) -> None:
                await stream.aclose()
                order.append("upstream closed")

        response.stream = Noted()
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_with_no_grace_the_upstream_is_closed_before_the_ledger_row_is_written(tmp_path: Path) -> None:
    tokens = [f'data: {{"choices":[{{"delta":{{"content":"t{i} "}}}}]}}\n\n'.encode() for i in range(3)]
    reply = Reply(pieces=[*tokens, 0.02], repeat=[tokens[0], 0.02])  # then a token every 20 ms until we hang up
    order: list[str] = []
    with FakeUpstream(lambda seen: reply) as upstream:
        app = Gateway({**ENV, "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": upstream.url, "USAGE_DB": str(tmp_path / "u.db")})
        services = app.start()
        await services.http.aclose()
        services.http = httpx.AsyncClient(transport=NotingTransport(order))
        assert app.start().config.usage_db  # reading the settings opens the ledger
        assert app.start().ledger is not None
        put = app.start().ledger.put  # the row is queued for the ledger's thread: the first ledger work a stream's end does
        app.start().ledger.put = lambda row: (order.append("ledger row"), put(row))[1]  # type: ignore[method-assign]
        async with watched(app, {"messages": [{"role": "user", "content": "hi"}], "backend": "openai"}) as ex:
            await leave_after_first_token(ex)
        assert order == ["upstream closed", "ledger row"]
        assert app.metrics.streams == {("openai", "cancelled"): 1}
        assert upstream.wait_for(lambda: upstream.seen[0].closed_by_client is not None)
        await app.aclose()
