"""Named upstreams and model aliases (CONFIG_FILE; ../shared/DESIGN.md, Routing):
the file's refusals stop startup naming the entry; every named upstream is a
backend; through an alias each target gets one attempt, a retryable failure
before any output hands the request to the next target, anything else (and
anything after the first output) is final; the client, the log line, the
ledger and /metrics say which target served. Key pools take their keys in
turn, rest a key after a 429 and take one out after a 401 or 403; a circuit
breaker skips a failing alias target, then probes it. The gateway runs
in-process on asyncio and trio; each upstream is a FakeUpstream on a real socket."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from asgi_stream import Gateway
from asgi_stream_core.config import ConfigError, load_config
from tests.conftest import free_port
from tests.test_faults_trio import HTTPX_ABANDONED_GENERATORS
from tests.test_inprocess import ENV, exchange, post_json, request, sse_events
from tests.test_retries import START, anthropic_events
from tests.upstream import FakeUpstream, Reply, Seen, sse_tokens

pytestmark = pytest.mark.anyio

A_TOKENS, B_TOKENS, C_TOKENS = ["Hello", " from", " a"], ["Bonjour", " de", " b"], ["Hola", " c"]
KEYS = {"A_KEY": "sk-a-SECRET", "B_KEY": "sk-b-SECRET", "C_KEY": "sk-c-SECRET"}


def error_reply(status: int, message: str = "busy", code: Any = None) -> Reply:
    body = json.dumps({"error": {"message": f"{message} {status}", "type": "server_error", "code": code}}).encode()
    return Reply(status, "application/json", [body])


class Scripted:
    """An upstream's replies by request number (the last repeats)."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.count = 0

    def __call__(self, seen: Seen) -> Reply:
        self.count += 1
        return self.replies[min(self.count, len(self.replies)) - 1]


def file_text(urls: dict[str, str], aliases: str = 'smart = ["a/model-a", "b/model-b"]\nwide = ["smart", "c/claude-c"]') -> str:
    return f"""
[upstreams.a]
format = "openai"
base_url = "{urls['a']}/v1"
default_model = "model-a"
keys = ["A_KEY"]
first_token_timeout = 0.4

[upstreams.b]
format = "openai"
base_url = "{urls['b']}/v1"
default_model = "model-b"
keys = ["B_KEY"]

[upstreams.c]
format = "anthropic"
base_url = "{urls['c']}"
default_model = "claude-c"
keys = ["C_KEY"]

[aliases]
{aliases}
"""


class Upstreams:
    """Three fake upstreams, a and b (OpenAI's wire format) and c (Anthropic's), and a gateway routed over them."""

    def __init__(self, tmp_path: Path, stack: ExitStack):
        self.tmp_path, self.stack = tmp_path, stack
        self.fakes: dict[str, FakeUpstream] = {}
        self.scripts: dict[str, Scripted] = {}
        for name, tokens in (("a", A_TOKENS), ("b", B_TOKENS)):
            self.script(name, sse_tokens(tokens))
        self.script("c", anthropic_events(START, *[delta(t) for t in C_TOKENS], STOP))

    def script(self, name: str, *replies: Reply) -> None:
        script = self.scripts.setdefault(name, Scripted())
        script.replies = list(replies)
        if name not in self.fakes:
            self.fakes[name] = self.stack.enter_context(FakeUpstream(script))

    def seen(self, name: str) -> list[Seen]:
        return self.fakes[name].seen

    def gateway(self, urls: dict[str, str] | None = None, aliases: str | None = None, **env: str) -> Gateway:
        path = self.tmp_path / "routing.toml"
        urls = {**{n: f.url for n, f in self.fakes.items()}, **(urls or {})}
        path.write_text(file_text(urls) if aliases is None else file_text(urls, aliases))
        return Gateway({**ENV, **KEYS, "CONFIG_FILE": str(path), "FIRST_TOKEN_TIMEOUT_SECONDS": "5", **env})


def delta(text: str) -> tuple[str, dict[str, Any]]:
    return ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})


STOP = ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}})
OVERLOADED = ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[Upstreams]:
    with ExitStack() as stack:
        yield Upstreams(tmp_path, stack)


async def chat(app: Gateway, **fields: Any) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    ex = await request(app, "POST", "/chat/stream", **post_json({"messages": [{"role": "user", "content": "hi"}], **fields}))
    assert ex.status == 200
    return sse_events(ex.body)[1:], ex.headers


def of(events: list[tuple[str, str, str]], name: str) -> list[str]:
    return [data for event, data, _ in events if event == name]


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused


# --- fallback before the first output ------------------------------------------------------

RETRYABLE: dict[str, Callable[[], Reply]] = {
    **{str(status): (lambda status=status: error_reply(status)) for status in (429, 500, 502, 503, 504, 529)},
    "cut before any output": lambda: Reply(pieces=[b": still thinking\n\n"], end="close"),
    "first-token deadline": lambda: Reply(pieces=[], end="hang"),
}


@pytest.mark.parametrize("failure", RETRYABLE)
async def test_a_retryable_failure_before_any_output_hands_the_request_to_the_next_target(
        ups: Upstreams, anyio_backend: str, failure: str) -> None:  # fmt: skip
    ups.script("a", RETRYABLE[failure]())
    app = ups.gateway()
    events, _ = await chat(app, model="smart")
    assert "".join(of(events, "token")) == "".join(B_TOKENS)  # b's text, whole, and nothing of a's
    assert [name for name, _, _ in events][:2] == ["route", "token"] and of(events, "done") == ["stop"]
    assert orjson.loads(of(events, "route")[0]) == {"backend": "b", "model": "model-b", "attempts": 2}
    assert len(ups.seen("a")) == 1 and len(ups.seen("b")) == 1  # one attempt per target: no retries of a
    assert ups.seen("b")[0].json["model"] == "model-b" and ups.seen("b")[0].headers["authorization"] == "Bearer sk-b-SECRET"
    outcome = {"first-token deadline": "timeout", "cut before any output": "protocol_error"}.get(failure, failure)
    assert app.metrics.attempts == {("a", outcome): 1, ("b", "served"): 1}
    await app.aclose()


async def test_connection_refused_hands_the_request_to_the_next_target(ups: Upstreams, anyio_backend: str) -> None:
    app = ups.gateway({"a": dead_url()})
    events, _ = await chat(app, model="smart")
    assert "".join(of(events, "token")) == "".join(B_TOKENS)
    assert app.metrics.attempts == {("a", "upstream_unavailable"): 1, ("b", "served"): 1}
    await app.aclose()


@pytest.mark.filterwarnings(HTTPX_ABANDONED_GENERATORS)  # trio: an in-band error leaves httpx's generators to the collector
async def test_an_in_stream_overload_before_any_text_moves_on_across_wire_formats(ups: Upstreams, anyio_backend: str) -> None:
    ups.script("c", anthropic_events(START, ("ping", {"type": "ping"}), OVERLOADED))
    app = ups.gateway(aliases='smart = ["c/claude-c", "a/model-a"]')
    events, _ = await chat(app, model="smart")
    assert "".join(of(events, "token")) == "".join(A_TOKENS)
    assert orjson.loads(of(events, "route")[0]) == {"backend": "a", "model": "model-a", "attempts": 2}
    assert app.metrics.attempts == {("c", "upstream_error"): 1, ("a", "served"): 1}
    await app.aclose()


NOT_RETRYABLE: dict[str, tuple[Reply, str]] = {
    **{str(status): (error_reply(status, "refused"), str(status)) for status in (400, 401, 403, 404)},
    "a malformed stream": (Reply(pieces=[b"data: [DONE]\n\n"]), "protocol_error"),
}


@pytest.mark.parametrize("failure", NOT_RETRYABLE)
async def test_a_failure_that_is_not_retryable_ends_the_stream_at_once(ups: Upstreams, anyio_backend: str, failure: str) -> None:
    reply, outcome = NOT_RETRYABLE[failure]
    ups.script("a", reply)
    app = ups.gateway()
    events, _ = await chat(app, model="smart")
    assert of(events, "token") == [] and of(events, "route") == [] and of(events, "done") == ["error"]
    assert len(ups.seen("b")) == 0 and app.metrics.attempts == {("a", outcome): 1}
    await app.aclose()


async def test_exhausted_quota_is_not_worth_the_next_target(ups: Upstreams, anyio_backend: str) -> None:
    ups.script("a", error_reply(429, "quota", code="insufficient_quota"))
    app = ups.gateway()
    events, _ = await chat(app, model="smart")
    assert orjson.loads(of(events, "error")[0])["code"] == "insufficient_quota" and len(ups.seen("b")) == 0
    await app.aclose()


async def test_after_the_first_output_nothing_is_switched(ups: Upstreams, anyio_backend: str) -> None:
    cut = sse_tokens(A_TOKENS)
    cut.pieces, cut.end = cut.pieces[:2], "close"  # two tokens, then the connection is cut
    ups.script("a", cut)
    app = ups.gateway()
    events, _ = await chat(app, model="smart")
    assert of(events, "token") == A_TOKENS[:2]  # what a sent, once; nothing of b
    assert of(events, "done") == ["error"] and orjson.loads(of(events, "error")[0])["type"] == "protocol_error"
    assert orjson.loads(of(events, "route")[0]) == {"backend": "a", "model": "model-a", "attempts": 1}
    assert len(ups.seen("b")) == 0 and app.metrics.attempts == {("a", "served"): 1}
    await app.aclose()


async def test_when_every_target_fails_the_last_failure_is_reported(ups: Upstreams, anyio_backend: str) -> None:
    ups.script("a", error_reply(503))
    ups.script("b", error_reply(502))
    ups.script("c", error_reply(500))
    app = ups.gateway()
    events, _ = await chat(app, model="wide")  # wide = smart (a, b), then c: aliases expand in place
    error = orjson.loads(of(events, "error")[0])
    assert error["status"] == 500 and of(events, "route") == []
    assert [len(ups.seen(n)) for n in "abc"] == [1, 1, 1]
    assert app.metrics.attempts == {("a", "503"): 1, ("b", "502"): 1, ("c", "500"): 1}
    await app.aclose()


async def test_the_chain_stays_within_the_requests_first_token_deadline(ups: Upstreams, anyio_backend: str) -> None:
    ups.script("a", Reply(pieces=[], end="hang"))
    ups.script("b", Reply(pieces=[], end="hang"))
    app = ups.gateway(FIRST_TOKEN_TIMEOUT_SECONDS="0.8")  # a's own 0.4 s, then b until 0.8 s in all
    started = anyio.current_time()
    events, _ = await chat(app, model="smart")
    assert anyio.current_time() - started < 2
    assert orjson.loads(of(events, "error")[0])["message"] == "first-token deadline: no token within 0.8 s"
    await app.aclose()


# --- cancel ------------------------------------------------------------------------------


@pytest.mark.parametrize("during", ["a", "b"])  # the first attempt, or the second after a's 503
@pytest.mark.parametrize("how", ["client leaves", "DELETE"])
async def test_a_cancel_during_an_attempt_closes_it_and_starts_no_other(ups: Upstreams, anyio_backend: str, how: str,
                                                                        during: str) -> None:  # fmt: skip
    if during == "b":
        ups.script("a", error_reply(503))
    ups.script(during, Reply(delay_headers=3600))  # accepts, never answers: the attempt is running
    body = post_json({"messages": [{"role": "user", "content": "hi"}], "model": "wide"})  # a, b, then c
    app = ups.gateway(FIRST_TOKEN_TIMEOUT_SECONDS="30")
    running = ups.fakes[during]
    async with exchange(app, "POST", "/chat/stream", **body) as ex:
        with anyio.fail_after(5):
            while not running.seen:
                await anyio.sleep(0.01)
        if how == "DELETE":
            await ex.next()  # the response's start, with the stream's id
            stream_id = ex.headers["x-stream-id"]
            assert (await request(app, "DELETE", f"/chat/stream/{stream_id}")).status == 204
        else:
            ex.disconnect()
        with anyio.fail_after(5):
            await ex.done.wait()
    assert running.wait_for(lambda: running.seen[0].closed_by_client is not None, 5)  # that attempt's request was closed
    await anyio.sleep(0.1)
    later = "bc" if during == "a" else "c"
    assert [len(ups.seen(n)) for n in later] == [0] * len(later)  # and no later attempt started
    before = {("a", "503"): 1} if during == "b" else {}
    assert app.metrics.attempts == {**before, (during, "cancelled"): 1}
    await app.aclose()


# --- seen everywhere -----------------------------------------------------------------------


async def test_the_v1_doors_name_the_target_that_served(ups: Upstreams, anyio_backend: str) -> None:
    ups.script("a", error_reply(503))
    app = ups.gateway()
    body = {"model": "smart", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ex = await request(app, "POST", "/v1/chat/completions", **post_json(body))
    chunks = [orjson.loads(e[1]) for e in sse_events(ex.body) if e[1] != "[DONE]"]
    assert {c["model"] for c in chunks} == {"b/model-b"}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "".join(B_TOKENS)
    whole = await request(app, "POST", "/v1/chat/completions", **post_json({**body, "stream": False}))
    assert orjson.loads(whole.body)["model"] == "b/model-b"
    message = await request(app, "POST", "/v1/messages", **post_json({**body, "stream": False, "max_tokens": 50}))
    assert orjson.loads(message.body)["model"] == "b/model-b"
    response = await request(app, "POST", "/v1/responses", **post_json({"model": "smart", "input": "hi", "store": False}))
    assert orjson.loads(response.body)["model"] == "b/model-b" and orjson.loads(response.body)["output_text"] == "".join(B_TOKENS)
    await app.aclose()


async def test_the_log_line_and_the_ledger_row_say_which_target_served(
        ups: Upstreams, anyio_backend: str, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    ups.script("a", error_reply(503))
    db = ups.tmp_path / "usage.db"
    app = ups.gateway(USAGE_DB=str(db))
    with caplog.at_level(logging.INFO, "asgi_stream"):
        await chat(app, model="smart")
        await chat(app, backend="b")  # a plain named backend: its own retries, no attempts counted
    await app.aclose()
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith('{"event":"stream_end"')]
    assert [(f["backend"], f["served_upstream"], f["served_model"], f["attempts"]) for f in lines] == [
        ("smart", "b", "model-b", 2), ("b", None, None, None)]
    with sqlite3.connect(db) as ledger:
        rows = ledger.execute("SELECT backend, model, served_upstream, served_model, attempts FROM usage ORDER BY started_at").fetchall()
    assert sorted(rows, key=str) == sorted([("smart", "smart", "b", "model-b", 2), ("b", "model-b", None, None, None)], key=str)


async def test_metrics_count_attempts_per_upstream_and_outcome(ups: Upstreams, anyio_backend: str) -> None:
    ups.script("a", error_reply(503))
    app = ups.gateway()
    await chat(app, model="smart")
    text = (await request(app, "GET", "/metrics")).body.decode()
    assert 'asgi_stream_attempts_total{upstream="a",outcome="503"} 1' in text
    assert 'asgi_stream_attempts_total{upstream="b",outcome="served"} 1' in text
    await app.aclose()


# --- named upstreams are backends; aliases are model names -----------------------------------


async def test_every_named_upstream_is_a_backend_on_both_routes(ups: Upstreams, anyio_backend: str) -> None:
    app = ups.gateway()
    events, _ = await chat(app, backend="c")
    assert "".join(of(events, "token")) == "".join(C_TOKENS) and of(events, "route") == []  # no alias: no route event
    assert ups.seen("c")[0].json["model"] == "claude-c" and ups.seen("c")[0].headers["x-api-key"] == "sk-c-SECRET"
    body = {"model": "a/other-model", "messages": [{"role": "user", "content": "hi"}]}
    whole = await request(app, "POST", "/v1/chat/completions", **post_json(body))
    assert orjson.loads(whole.body)["model"] == "a/other-model" and ups.seen("a")[0].json["model"] == "other-model"
    await app.aclose()


async def test_aliases_are_listed_and_refused_beside_a_backend(ups: Upstreams, anyio_backend: str) -> None:
    app = ups.gateway()
    models = [m["id"] for m in orjson.loads((await request(app, "GET", "/v1/models")).body)["data"]]
    assert models == ["echo/echo", "a/model-a", "b/model-b", "c/claude-c", "smart", "wide"]
    listed = orjson.loads((await request(app, "GET", "/backends")).body)
    assert listed["aliases"] == [{"name": "smart", "targets": ["a/model-a", "b/model-b"]},
                                 {"name": "wide", "targets": ["a/model-a", "b/model-b", "c/claude-c"]}]  # fmt: skip
    ex = await request(app, "POST", "/chat/stream", **post_json({"messages": [{"role": "user", "content": "hi"}],
                                                                "model": "smart", "backend": "a"}))  # fmt: skip
    assert ex.status == 400 and b"is an alias" in ex.body
    await app.aclose()


async def test_an_error_through_an_alias_never_shows_a_named_upstreams_key(ups: Upstreams, anyio_backend: str) -> None:
    ups.script("a", error_reply(401, "bad key sk-a-SECRET"))
    app = ups.gateway()
    events, _ = await chat(app, model="smart")
    assert "sk-a-SECRET" not in of(events, "error")[0] and "[redacted]" in of(events, "error")[0]
    await app.aclose()


# --- the file's refusals ---------------------------------------------------------------------


def refusal(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    path = tmp_path / "routing.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config({**KEYS, "CONFIG_FILE": str(path), **(env or {})})
    return str(raised.value)


UPSTREAM = '[upstreams.x]\nformat = "openai"\nbase_url = "http://h/v1"\ndefault_model = "m"\nkeys = ["A_KEY"]\n'


@pytest.mark.parametrize(("text", "named"), [
    (UPSTREAM.replace('"openai"', '"grpc"'), "[upstreams.x] format = 'grpc' is not one of openai, anthropic, gemini, ollama"),
    (UPSTREAM.replace("A_KEY", "UNSET_KEY"), "[upstreams.x] keys: the environment variable UNSET_KEY is not set"),
    (UPSTREAM + '[aliases]\ns = ["nowhere/m"]\n', "[aliases] s[0] = 'nowhere/m': no upstream 'nowhere'"),
    (UPSTREAM + '[aliases]\ns = ["x/m", "t"]\nt = ["s"]\n', "[aliases] s: a cycle (s -> t -> s)"),
    (UPSTREAM + '[aliases]\ns = ["s"]\n', "[aliases] s: a cycle (s -> s)"),
    (UPSTREAM + '[aliases]\ns = ["x/m", "missing"]\n', "[aliases] s[1] = 'missing': no alias of that name"),
    (UPSTREAM + '[aliases]\ns = []\n', "[aliases] s must be a non-empty list"),
    (UPSTREAM + '[aliases]\nx = ["x/m"]\n', "[aliases] x: 'x' is already the name of a backend or upstream"),
    (UPSTREAM.replace("upstreams.x", "upstreams.openai"), "[upstreams.openai]: 'openai' is already the name of a backend"),
    (UPSTREAM.replace('"http://h/v1"', '"h/v1"'), "[upstreams.x] base_url must be a string starting with http://"),
    (UPSTREAM + "first_token_timeout = -1\n", "[upstreams.x] first_token_timeout must be a positive number"),
    (UPSTREAM + "colour = 1\n", "[upstreams.x]: unknown field 'colour'"),
    ("[upstreams.x\n", "is not valid TOML"),
])  # fmt: skip
def test_each_refusal_of_the_file_stops_startup_naming_the_entry(tmp_path: Path, text: str, named: str) -> None:
    message = refusal(tmp_path, text)
    assert message.startswith(f"CONFIG_FILE {tmp_path / 'routing.toml'}: ") and named in message


def test_an_unreadable_file_stops_startup(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config({"CONFIG_FILE": str(tmp_path / "missing.toml")})


def test_without_config_file_nothing_changes() -> None:
    config = load_config({})
    assert config.routing.upstreams == {} and config.routing.aliases == {} and set(config.upstreams) == {"echo"}


def test_an_alias_may_name_an_environment_backend(tmp_path: Path) -> None:
    path = tmp_path / "routing.toml"
    path.write_text(UPSTREAM + '[aliases]\ns = ["openai/gpt-4o-mini", "x/m"]\n')
    config = load_config({**KEYS, "OPENAI_API_KEY": "sk", "CONFIG_FILE": str(path)})
    assert [str(t) for t in config.routing.aliases["s"]] == ["openai/gpt-4o-mini", "x/m"]
    assert "no upstream 'openai'" in refusal(tmp_path, UPSTREAM + '[aliases]\ns = ["openai/gpt-4o-mini"]\n')



# --- key pools -------------------------------------------------------------------------------

POOL_KEYS = {"P1": "sk-p1-SECRET", "P2": "sk-p2-SECRET", "P3": "sk-p3-SECRET"}


def pool_gateway(tmp_path: Path, url: str) -> Gateway:
    path = tmp_path / "pool.toml"
    path.write_text(f'[upstreams.p]\nformat = "openai"\nbase_url = "{url}/v1"\ndefault_model = "m"\nkeys = ["P1", "P2", "P3"]\n')
    return Gateway({**ENV, **POOL_KEYS, "CONFIG_FILE": str(path)})


def key_of(seen: Seen) -> str:
    return next(name for name, value in POOL_KEYS.items() if seen.headers["authorization"] == f"Bearer {value}")


async def keys_in_service(app: Gateway) -> int:
    return int(orjson.loads((await request(app, "GET", "/healthz")).body)["keys_in_service"]["p"])


async def test_a_pool_spreads_requests_over_its_keys_in_turn(tmp_path: Path, anyio_backend: str) -> None:
    with FakeUpstream(lambda seen: sse_tokens(["ok"])) as upstream:
        app = pool_gateway(tmp_path, upstream.url)
        for _ in range(6):
            events, _ = await chat(app, backend="p")
            assert of(events, "token") == ["ok"]
        assert [key_of(seen) for seen in upstream.seen] == ["P1", "P2", "P3", "P1", "P2", "P3"]
        assert await keys_in_service(app) == 3
        await app.aclose()


async def test_a_key_that_gets_429_rests_while_the_others_serve_then_returns(tmp_path: Path, anyio_backend: str) -> None:
    busy = {"P1"}

    def respond(seen: Seen) -> Reply:
        return Reply(429, "application/json", [b'{"error": {"message": "slow down"}}'], {"retry-after": "0.5"}) \
            if key_of(seen) in busy else sse_tokens(["ok"])  # fmt: skip

    with FakeUpstream(respond) as upstream:
        app = pool_gateway(tmp_path, upstream.url)
        for _ in range(4):  # a burst: P1's 429 moves the request to P2 at once, and P1 rests
            events, _ = await chat(app, backend="p")
            assert of(events, "token") == ["ok"]
        assert [key_of(seen) for seen in upstream.seen] == ["P1", "P2", "P3", "P2", "P3"]
        assert await keys_in_service(app) == 2
        metrics = (await request(app, "GET", "/metrics")).body.decode()
        assert 'asgi_stream_keys_in_service{upstream="p"} 2' in metrics
        busy.clear()
        await anyio.sleep(0.6)  # its Retry-After is over
        assert await keys_in_service(app) == 3
        await chat(app, backend="p")
        await chat(app, backend="p")
        assert "P1" in [key_of(seen) for seen in upstream.seen[-2:]]
        await app.aclose()


async def test_a_refused_key_is_taken_out_and_logged_by_name(tmp_path: Path, anyio_backend: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    def respond(seen: Seen) -> Reply:
        return error_reply(401, "bad key") if key_of(seen) == "P1" else sse_tokens(["ok"])

    with FakeUpstream(respond) as upstream, caplog.at_level(logging.INFO, "asgi_stream"):
        app = pool_gateway(tmp_path, upstream.url)
        for _ in range(3):
            events, _ = await chat(app, backend="p")
            assert of(events, "token") == ["ok"]
        assert [key_of(seen) for seen in upstream.seen] == ["P1", "P2", "P3", "P2"]  # P1 once, then never again
        assert await keys_in_service(app) == 2
        refused = [orjson.loads(r.getMessage()) for r in caplog.records if '"key_refused"' in r.getMessage()]
        assert refused == [{"event": "key_refused", "upstream": "p", "variable": "P1", "status": 401, "keys_in_service": 2}]
        assert not any("sk-p1-SECRET" in r.getMessage() for r in caplog.records)
        await app.aclose()


async def test_when_every_key_is_refused_the_last_refusal_is_the_answer(tmp_path: Path, anyio_backend: str) -> None:
    with FakeUpstream(lambda seen: error_reply(403, "forbidden")) as upstream:
        app = pool_gateway(tmp_path, upstream.url)
        events, _ = await chat(app, backend="p")
        assert orjson.loads(of(events, "error")[0])["status"] == 403 and len(upstream.seen) == 3
        events, _ = await chat(app, backend="p")  # none left: no upstream request at all
        assert orjson.loads(of(events, "error")[0])["code"] == "no_key_in_service" and len(upstream.seen) == 3
        await app.aclose()


# --- circuit breaker -------------------------------------------------------------------------


async def test_an_upstream_that_keeps_failing_is_skipped_then_probed_by_one_request(ups: Upstreams, anyio_backend: str) -> None:
    ups.script("a", error_reply(503))
    app = ups.gateway()
    breaker = app.start().breakers["a"]
    breaker.cool_down = 0.3
    for _ in range(breaker.failures_to_open + 2):
        events, _ = await chat(app, model="smart")
        assert "".join(of(events, "token")) == "".join(B_TOKENS)  # b serves every one
    assert len(ups.seen("a")) == breaker.failures_to_open  # then a is skipped: no request reaches it
    assert app.metrics.attempts[("a", "circuit_open")] == 2
    assert orjson.loads((await request(app, "GET", "/healthz")).body)["circuits"] == {"a": "open"}
    await anyio.sleep(0.35)
    ups.script("a", sse_tokens(A_TOKENS))  # a is back
    events, _ = await chat(app, model="smart")  # the probe
    assert "".join(of(events, "token")) == "".join(A_TOKENS) and breaker.state == "closed"
    assert "circuits" not in orjson.loads((await request(app, "GET", "/healthz")).body)
    await app.aclose()


async def test_a_failed_probe_opens_the_circuit_again(ups: Upstreams, anyio_backend: str) -> None:
    ups.script("a", error_reply(503))
    app = ups.gateway()
    breaker = app.start().breakers["a"]
    breaker.cool_down = 0.2
    for _ in range(breaker.failures_to_open):
        await chat(app, model="smart")
    await anyio.sleep(0.25)
    await chat(app, model="smart")  # the probe fails
    assert len(ups.seen("a")) == breaker.failures_to_open + 1 and breaker.state == "open"
    await chat(app, model="smart")
    assert len(ups.seen("a")) == breaker.failures_to_open + 1
    await app.aclose()


def test_the_readmes_example_file_loads_and_its_aliases_expand_in_order(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    path = tmp_path / "routing.toml"
    path.write_text("# routing.toml" + readme.split("```toml\n# routing.toml", 1)[1].split("```", 1)[0])
    config = load_config({"CONFIG_FILE": str(path), "OPENAI_KEY_1": "a", "OPENAI_KEY_2": "b", "ANTHROPIC_KEY": "c"})
    assert set(config.upstreams) == {"echo", "openai-main", "local", "claude"}
    assert config.backend("local").stream is config.backend("openai-main").stream  # vLLM: OpenAI's wire format
    assert [str(t) for t in config.routing.aliases["any"]] == [  # cheap, then smart, each target once
        "local/Qwen/Qwen2.5-7B-Instruct", "openai-main/gpt-4o-mini", "claude/claude-sonnet-4-20250514", "openai-main/gpt-4o"]
