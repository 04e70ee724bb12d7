"""The browser's own EventSource (Debian's Chromium via Playwright) reading a
stream through a real nginx that balances round robin over two gateway
replicas sharing one redis-server, with the connection cut at random points:
each reconnect lands on the other replica, and the answer is lossless, from
one upstream request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.redis_server import RedisServer
from tests.replicas import RandomCuttingProxy, gateway_env, respond, run_balancer, run_replicas, seen_with, words
from tests.servers import Process, require_program
from tests.test_browser import CHROMIUM_ARGS
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(300)

COLLECT = """(url) => new Promise((resolve) => {
    const result = {tokens: [], ids: [], opens: 0, errors: 0};
    const source = new EventSource(url);
    source.onopen = () => { result.opens += 1; };
    source.addEventListener("token", (e) => { result.tokens.push(e.data); result.ids.push(e.lastEventId); });
    source.addEventListener("done", (e) => { result.done = e.data; source.close(); resolve(result); });
    source.addEventListener("error", (e) => {
        if (e.data !== undefined) { result.error = e.data; return; }
        result.errors += 1;
        if (source.readyState === EventSource.CLOSED) { resolve(result); }
    });
    setTimeout(() => { source.close(); result.timedOut = true; resolve(result); }, 120000);
})"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(respond) as fake:
        yield fake


@pytest.fixture(scope="module")
def balanced(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[Process], Path]]:
    """nginx round robin over two uvicorn replicas on one Redis; yields nginx's
    URL, the replicas, and the directory of nginx's per-request replica log."""
    tmp = tmp_path_factory.mktemp("balanced")
    redis = RedisServer(tmp)
    redis.start()
    try:
        with (
            run_replicas(["uvicorn", "uvicorn"], gateway_env(upstream, redis.url), tmp) as replicas,
            run_balancer([r.url.removeprefix("http://") for r in replicas], tmp) as url,
        ):
            yield url, replicas, tmp
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = require_program("chromium", "/usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_eventsource_through_round_robin_nginx_cut_at_random_points_loses_nothing(
    seed: int, browser: Any, balanced: tuple[str, list[Process], Path], upstream: FakeUpstream
) -> None:
    url, replicas, tmp = balanced
    prompt = f"slow 60 0.1 browser{seed}"
    nginx_port = int(url.rsplit(":", 1)[1])
    # Cuts fall after the first event (a cut before any id is seen makes EventSource
    # start afresh, by the spec) and before the stream ends: 60 events of ~55 bytes.
    proxy = RandomCuttingProxy(nginx_port, cuts=3, low=500, high=1100, seed=seed)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{proxy.port}/")
        result = page.evaluate(COLLECT, f"/chat/stream?backend=openai&prompt={quote(prompt)}")
    finally:
        context.close()
        proxy.close()
    assert proxy.cuts == 3, ("the proxy did not cut the stream three times", proxy.cut_at)
    assert not result.get("timedOut") and result["done"] == "stop", result
    assert result["opens"] == 4 and result["errors"] == 3, result  # three cuts, three reconnects, each answered 200
    assert "".join(result["tokens"]) == "".join(words(60))
    assert [int(i.rsplit(".", 1)[1]) for i in result["ids"]] == list(range(1, 61))  # every token once, in order
    assert len({i.rsplit(".", 1)[0] for i in result["ids"]}) == 1  # one generation
    assert len(seen_with(upstream, prompt)) == 1  # one upstream request
    # nginx really sent the reconnects to both replicas
    served = [line.split() for line in (tmp / "replicas.log").read_text().splitlines()]
    replicas_used = {addr for method, path, status, addr in served if path == "/chat/stream" and status == "200"}
    assert replicas_used == {r.url.removeprefix("http://") for r in replicas}, served
