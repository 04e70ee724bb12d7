"""A real nginx, configured by the repo's own nginx.conf (only addresses and
proxy_read_timeout substituted), in front of the gateway: events pass
through unbuffered, heartbeats outlast nginx's idle timer, and a client that
leaves nginx cancels the upstream generation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Served, serve, stream
from tests.servers import SITE_ACCESS_LOG, body_of, open_stream, post_request, read_until, run_nginx
from tests.upstream import FakeUpstream, Reply, Seen, sse_tokens

READ_TIMEOUT = 2.0  # nginx's proxy_read_timeout in these tests, seconds: heartbeats every 0.5 s leave a slow machine 1.5 s of slack


def respond(seen: Seen) -> Reply:
    prompt = seen.json["messages"][-1]["content"]
    if prompt == "slow":  # goes on for 20 s unless the gateway hangs up
        return sse_tokens([f" w{i}" for i in range(400)], pause=0.05)
    if prompt == "drip":  # silent for longer than nginx's read timeout between tokens
        return sse_tokens(["a", "b"], pause=READ_TIMEOUT * 2)
    return sse_tokens(["Hello", " world"])


def openai_body(prompt: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": prompt}], "backend": "openai"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(respond) as fake:
        yield fake


def gateway_env(upstream: FakeUpstream, heartbeat: float) -> dict[str, str]:
    return {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream.url + "/v1", "HEARTBEAT_SECONDS": str(heartbeat)}


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream) -> Iterator[Served]:
    with serve(gateway_env(upstream, heartbeat=READ_TIMEOUT / 4)) as served:
        yield served


@pytest.fixture(scope="module")
def nginx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nginx")


@pytest.fixture(scope="module")
def proxy(gateway: Served, nginx_dir: Path) -> Iterator[str]:
    with run_nginx(gateway.url, nginx_dir, read_timeout=f"{READ_TIMEOUT * 1000:.0f}ms") as url:
        yield url


def test_the_access_log_records_the_request_without_the_key(proxy: str, nginx_dir: Path) -> None:
    """EventSource clients send the API key in the query: nginx.conf's own
    access log must keep it (and the prompt) out, yet log the request."""
    result = stream("GET", proxy + "/chat/stream?prompt=private+words&backend=openai&access_token=SECRET-k3y")
    assert result.text == "Hello world"
    log = nginx_dir / SITE_ACCESS_LOG
    deadline = time.monotonic() + 10
    while "GET /chat/stream" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the request was not logged"
        time.sleep(0.05)
    written = "".join(p.read_text(errors="replace") for p in nginx_dir.glob("*.log"))  # both access logs and the error log
    assert "SECRET-k3y" not in written and "private" not in written
    assert '"GET /chat/stream HTTP/1.1" 200 ' in log.read_text()


def test_a_stream_through_nginx_is_the_same_stream(proxy: str) -> None:
    result = stream("POST", proxy + "/chat/stream", json=openai_body("hi"), headers={"accept-encoding": "gzip"})
    assert result.status == 200
    assert result.text == "Hello world" and result.of("done") == ["stop"]
    assert "content-encoding" not in result.headers  # no gzip on text/event-stream
    assert result.headers["x-stream-id"]


def test_the_first_token_arrives_through_nginx_while_the_upstream_is_still_generating(proxy: str, upstream: FakeUpstream) -> None:
    since = len(upstream.seen)
    with open_stream(proxy, post_request("/chat/stream", json.dumps(openai_body("drip")).encode())) as sock:
        got = read_until(sock, lambda raw: b"data: a\n" in body_of(raw))
        seen = next(s for s in upstream.seen[since:] if s.json["messages"][-1]["content"] == "drip")
        assert not seen.completed and b"data: b\n" not in body_of(got)


def test_heartbeats_keep_a_slow_stream_open_past_the_read_timeout(proxy: str) -> None:
    started = time.monotonic()
    result = stream("POST", proxy + "/chat/stream", json=openai_body("drip"))
    assert time.monotonic() - started > 2 * READ_TIMEOUT  # silences longer than nginx's timer really happened
    assert result.text == "ab" and result.of("done") == ["stop"]


def test_without_heartbeats_nginx_cuts_a_slow_stream_at_its_read_timeout(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The control for the test above: the substituted timeout is real."""
    with (
        serve(gateway_env(upstream, heartbeat=30)) as gateway,
        run_nginx(gateway.url, tmp_path, read_timeout=f"{READ_TIMEOUT * 1000:.0f}ms") as url,
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            stream("POST", url + "/chat/stream", json=openai_body("drip"))
    assert "upstream timed out" in (tmp_path / "error.log").read_text()


def test_a_client_that_leaves_nginx_makes_the_app_cancel_the_upstream(
    proxy: str, upstream: FakeUpstream, gateway: Served
) -> None:
    since = len(upstream.seen)
    with open_stream(proxy, post_request("/chat/stream", json.dumps(openai_body("slow")).encode())) as sock:
        read_until(sock, lambda raw: body_of(raw).count(b"event: token") >= 3)
    closed_at = time.monotonic()
    seen = next(s for s in upstream.seen[since:] if s.json["messages"][-1]["content"] == "slow")
    assert upstream.wait_for(lambda: seen.closed_by_client is not None, 15), "the upstream request was never closed"
    # long before the reply's 20 s were over (generous: slow machines)
    assert seen.closed_by_client is not None and seen.closed_by_client - closed_at < 10 and not seen.completed
    assert upstream.wait_for(lambda: gateway.gateway.metrics.active == 0, 15)
    assert gateway.gateway.metrics.streams.get(("openai", "cancelled"), 0) >= 1


def test_nginx_refuses_bodies_over_the_apps_limit_and_passes_those_under_it(proxy: str) -> None:
    limit = 1_048_576  # client_max_body_size 1m == MAX_BODY_BYTES default
    padding = "x" * (limit - 100)
    under = json.dumps({"messages": [{"role": "user", "content": "ok"}], "pad": padding[: limit - 200]}).encode()
    assert len(under) <= limit
    assert (
        stream("POST", proxy + "/chat/stream?backend=echo", content=under, headers={"content-type": "application/json"}).text
        == "ok"
    )
    over = json.dumps({"messages": [{"role": "user", "content": padding + "x" * 200}]}).encode()
    response = httpx.post(proxy + "/chat/stream", content=over, headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_the_page_is_compressed_and_cancel_passes_through(proxy: str) -> None:
    page = httpx.get(proxy + "/", headers={"accept-encoding": "gzip"})
    assert page.status_code == 200 and page.headers["content-encoding"] == "gzip"
    assert httpx.delete(proxy + "/chat/stream/nosuchstream").status_code == 404
