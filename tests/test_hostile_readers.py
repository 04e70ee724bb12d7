"""Issue 23, findings 1 and 7, in-process on asyncio and trio (the upstream a
real socket: tests/upstream.py). Finding 1: a reader coming or going wakes no
other reader, and a stream has at most MAX_READERS_PER_STREAM readers (a resume
past it gets 429 with Retry-After). Finding 7: the doors without resume hold at
most STREAM_BUFFER_BYTES per stream (a streaming client that does not read is
let go once its position is dropped; a whole answer is cut there, `length`),
and an upstream that sends more than max_tokens tokens is cut there on every
route: the stream ends `length`, the upstream request is closed, the ledger
row says `length`."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from asgi_stream import Gateway
from asgi_stream_core import openai_api
from asgi_stream_core.record import StreamRecord
from tests.test_inprocess import ENV, exchange, post_json, request, sse_events
from tests.upstream import FakeUpstream, Reply

pytestmark = pytest.mark.anyio

BOUND = 65_536  # STREAM_BUFFER_BYTES in these tests
BIG = "x" * 4096  # a flood's token


def token_event(text: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}) + b"\n\n"


def flood(text: str, pause: float = 0.0) -> Reply:
    """An upstream that never stops sending tokens (until the gateway hangs up),
    after a first one and `pause` seconds."""
    return Reply(pieces=[token_event(text), pause], repeat=[token_event(text)])


def upstream_env(upstream: FakeUpstream, **more: str) -> dict[str, str]:
    return {**ENV, "OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": upstream.url + "/v1", "STREAM_BUFFER_BYTES": str(BOUND),
            "TOTAL_TIMEOUT_SECONDS": "8", **more}  # fmt: skip


# --- finding 1: readers of one stream ---------------------------------------------------------


def resume_of(stream_id: str) -> list[tuple[str, str]]:
    return [("last-event-id", f"{stream_id}.0")]


async def test_attaching_and_detaching_readers_wakes_no_other_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """n readers attached then detached one at a time: about n waits in all, not n squared."""
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "30", "HEARTBEAT_SECONDS": "60", "MAX_READERS_PER_STREAM": "1000"})
    waits = 0
    original = StreamRecord.wait

    async def counted(self: StreamRecord) -> None:
        nonlocal waits
        waits += 1
        await original(self)

    monkeypatch.setattr(StreamRecord, "wait", counted)
    n = 60
    async with exchange(app, "GET", "/chat/stream", "prompt=hi") as first:
        await first.next()
        await first.next_body()
        async with AsyncExitStack() as stack:
            for _ in range(n):
                resume = exchange(app, "GET", "/chat/stream", headers=resume_of(first.headers["x-stream-id"]))
                reader = await stack.enter_async_context(resume)
                assert (await reader.next())["status"] == 200
                await reader.next_body()
                await anyio.sleep(0)
        await anyio.sleep(0.05)
    await app.aclose()
    assert waits <= 3 * n, f"{waits} waits for {n} readers"


async def test_a_resume_past_the_readers_bound_gets_429_with_retry_after() -> None:
    app = Gateway({**ENV, "ECHO_DELAY_SECONDS": "30", "MAX_READERS_PER_STREAM": "3"})
    async with exchange(app, "GET", "/chat/stream", "prompt=hi") as first:
        await first.next()
        await first.next_body()
        resume = resume_of(first.headers["x-stream-id"])
        async with exchange(app, "GET", "/chat/stream", headers=resume) as a, exchange(app, "GET", "/chat/stream", headers=resume) as b:
            assert ((await a.next())["status"], (await b.next())["status"]) == (200, 200)
            refused = await request(app, "GET", "/chat/stream", headers=resume)
            assert refused.status == 429 and refused.headers["retry-after"] == "1"
            assert b"limit of 3 readers" in refused.body
        async with exchange(app, "GET", "/chat/stream", headers=resume) as again:  # a reader left: room again
            assert (await again.next())["status"] == 200
        assert app.metrics.active == 1  # a resume takes no stream slot
    await app.aclose()


# --- finding 7: the doors without resume hold at most the bound ---------------------------------


@pytest.fixture
def records(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[StreamRecord]]:
    made: list[StreamRecord] = []
    original = openai_api.completion_record

    def keep(*args: Any) -> StreamRecord:
        made.append(original(*args))
        return made[-1]

    monkeypatch.setattr(openai_api, "completion_record", keep)
    yield made


async def until(condition: Any, seconds: float = 8) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.01)


def held(record: StreamRecord) -> int:
    return len(record.read(record.first) or b"")


# On trio the client-gone cancel lands at the generation's loop top (generation.drive), so httpx's
# iterators under the closed upstream response are collected unexhausted: trio warns of them.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_v1_streaming_client_that_does_not_read_holds_at_most_the_bound_then_is_let_go(records: list[StreamRecord]) -> None:
    with FakeUpstream(lambda seen: flood(BIG, pause=0.2)) as upstream:  # the client is blocked on its first token by then
        app = Gateway(upstream_env(upstream))
        body = {"model": "openai/gpt-x", "stream": True, "max_tokens": 8192, "messages": [{"role": "user", "content": "hi"}]}
        async with exchange(app, "POST", "/v1/chat/completions", hold_sends_after=2, **post_json(body)) as ex:
            await until(lambda: bool(records) and records[0].tokens > 200)  # 800 KB past the client, which read none of it
            record = records[0]
            assert record.first > 0 and held(record) <= BOUND + 2 * len(BIG)
            ex.released.set()  # it reads at last: its position was dropped, so it is let go
            with anyio.fail_after(8):
                await ex.done.wait()
        assert ex.sent[-1].get("more_body") is True  # unfinished: dropped, as on /chat/stream
        assert upstream.wait_for(lambda: upstream.seen[0].closed_by_client is not None, 8)
        assert app.metrics.streams == {("openai", "cancelled"): 1}
        await app.aclose()


async def test_a_whole_v1_answer_is_cut_length_at_the_bound(records: list[StreamRecord]) -> None:
    with FakeUpstream(lambda seen: flood(BIG)) as upstream:
        app = Gateway(upstream_env(upstream))
        body = {"model": "openai/gpt-x", "max_tokens": 8192, "messages": [{"role": "user", "content": "hi"}]}
        ex = await request(app, "POST", "/v1/chat/completions", **post_json(body))
        assert ex.status == 200
        answer = orjson.loads(ex.body)
        assert answer["choices"][0]["finish_reason"] == "length"
        assert BOUND // 2 < len(answer["choices"][0]["message"]["content"]) <= BOUND + len(BIG)
        assert records[0].first == 0  # nothing dropped: the whole answer, cut
        assert upstream.wait_for(lambda: upstream.seen[0].closed_by_client is not None, 8)
        await app.aclose()


async def test_a_responses_stream_is_cut_length_at_the_bound() -> None:
    """Its stored items need the whole text: cut there, not dropped."""
    with FakeUpstream(lambda seen: flood(BIG)) as upstream:
        app = Gateway(upstream_env(upstream))
        body = {"model": "openai/gpt-x", "stream": True, "max_output_tokens": 8192, "input": "hi"}
        ex = await request(app, "POST", "/v1/responses", **post_json(body))
        events = sse_events(ex.body)
        last = orjson.loads(events[-1][1])
        assert last["type"] == "response.incomplete" and last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
        assert BOUND // 2 < len(last["response"]["output_text"]) <= BOUND + len(BIG)
        assert upstream.wait_for(lambda: upstream.seen[0].closed_by_client is not None, 8)
        await app.aclose()


# --- finding 7: max_tokens is enforced -------------------------------------------------------------


def ledger_rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT route, finish_reason, completion_tokens FROM usage").fetchall()


async def test_an_upstream_past_max_tokens_is_cut_on_chat_stream(tmp_path: Path) -> None:
    with FakeUpstream(lambda seen: flood("tok ")) as upstream:
        app = Gateway({**upstream_env(upstream), "USAGE_DB": str(tmp_path / "usage.db")})
        ex = await request(app, "GET", "/chat/stream", "prompt=hi&backend=openai&max_tokens=50")
        events = sse_events(ex.body)
        assert sum(name == "token" for name, _, _ in events) == 50
        assert events[-1][:2] == ("done", "length")
        assert upstream.wait_for(lambda: upstream.seen[0].closed_by_client is not None, 8)
        await app.aclose()
    assert ledger_rows(tmp_path / "usage.db") == [("chat/stream", "length", 50)]


@pytest.mark.parametrize("stream", [True, False])
async def test_an_upstream_past_max_tokens_is_cut_on_v1(tmp_path: Path, stream: bool) -> None:
    with FakeUpstream(lambda seen: flood("tok ")) as upstream:
        app = Gateway({**upstream_env(upstream), "USAGE_DB": str(tmp_path / "usage.db")})
        body = {"model": "openai/gpt-x", "stream": stream, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
        ex = await request(app, "POST", "/v1/chat/completions", **post_json(body))
        assert ex.status == 200
        if stream:
            chunks = [orjson.loads(data) for _, data, _ in sse_events(ex.body) if data != "[DONE]"]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        else:
            answer = orjson.loads(ex.body)
            text, finish = answer["choices"][0]["message"]["content"], [answer["choices"][0]["finish_reason"]]
        assert text == "tok " * 50 and finish == ["length"]
        assert upstream.wait_for(lambda: upstream.seen[0].closed_by_client is not None, 8)
        await app.aclose()
    assert ledger_rows(tmp_path / "usage.db") == [("v1/chat/completions", "length", 50)]
