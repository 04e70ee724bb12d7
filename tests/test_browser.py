"""The page at GET / in a real browser: Debian's headless Chromium driven by
Playwright. Type a prompt and watch the echo stream in, press Stop, see an
upstream error; and the native EventSource, through a TCP proxy that cuts
the connection mid-stream, reconnects and resumes with nothing lost or doubled."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Served, serve
from tests.replicas import RandomCuttingProxy
from tests.servers import require_program
from tests.upstream import FakeUpstream, Reply, Seen

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000


def refuse(seen: Seen) -> Reply:
    return Reply(
        401, "application/json", [b'{"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error"}}']
    )


@pytest.fixture(scope="module")
def gateway() -> Iterator[Served]:
    with FakeUpstream(refuse) as upstream, serve({
        "ECHO_DELAY_SECONDS": "0.05", "RESUME_GRACE_SECONDS": "5", "DEFAULT_BACKEND": "echo",
        "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream.url + "/v1", "OLLAMA_BASE_URL": upstream.url,
        "DEFAULT_MODEL": "echo-1",
    }) as served:  # fmt: skip
        yield served


THINKING = 60.0  # seconds the thinking upstream stays silent after its headers


@pytest.fixture(scope="module")
def thinking() -> Iterator[tuple[Served, FakeUpstream]]:
    """A gateway whose openai upstream thinks for a minute before its first
    token, and which serves one stream at a time."""
    reply = Reply(pieces=[THINKING, b'data: {"choices": [{"index": 0, "delta": {"content": "late"}}]}\n\n'])
    with FakeUpstream(lambda seen: reply) as upstream, serve({
        "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream.url + "/v1", "MAX_STREAMS": "1",
        "RESUME_GRACE_SECONDS": "0", "FIRST_TOKEN_TIMEOUT_SECONDS": str(THINKING * 2),
    }) as served:  # fmt: skip
        yield served, upstream


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


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        yield page
    finally:
        context.close()


WATCH_OUTPUT = """() => {
    const output = document.getElementById("output");
    window.seen = [];
    new MutationObserver(() => window.seen.push(output.textContent))
        .observe(output, {childList: true, characterData: true, subtree: true});
}"""


def test_the_page_streams_the_echo_of_a_typed_prompt(page: Any, gateway: Served) -> None:
    prompt = "The quick brown fox jumps over the lazy dog"
    streams: list[str] = []
    page.on("request", lambda request: streams.append(request.url) if "/chat/stream" in request.url else None)
    page.goto(gateway.url + "/")
    page.evaluate(WATCH_OUTPUT)
    page.fill("#prompt", prompt)
    page.select_option("#backend", "echo")
    page.click("#send")
    page.wait_for_function("document.getElementById('finish').textContent === 'stop'")
    assert page.text_content("#output") == prompt
    assert "completion" in page.text_content("#usage")
    assert page.text_content("#error") == ""
    seen = page.evaluate("window.seen")
    assert len(set(seen)) >= 5 and all(prompt.startswith(text) for text in seen)  # it grew token by token
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    page.wait_for_timeout(1500)  # longer than the stream's `retry: 1000`: a source left open would reconnect by now
    assert len(streams) == 1, streams  # the page closed its EventSource on done


def test_the_page_shows_reasoning_collapsed_and_apart_from_the_answer(page: Any, gateway: Served) -> None:
    page.goto(gateway.url + "/")
    assert page.is_hidden("#thinking")  # nothing to show until a turn reasons
    page.fill("#prompt", "Think it over")
    page.select_option("#backend", "echo")
    page.select_option("#effort", "low")
    page.click("#send")
    page.wait_for_function("document.getElementById('finish').textContent === 'stop'")
    assert page.text_content("#output") == "Think it over"  # the answer alone
    assert page.text_content("#reasoning") == "The user said 3 words; I answer in kind."
    assert page.is_visible("#thinking") and not page.evaluate("document.getElementById('thinking').open")
    assert page.is_hidden("#calls")


def test_stop_ends_the_generation_with_cancelled(page: Any, gateway: Served) -> None:
    prompt = " ".join(f"word{i}" for i in range(300))  # 15 s at 0.05 s a token
    page.goto(gateway.url + "/")
    page.fill("#prompt", prompt)
    page.select_option("#backend", "echo")
    page.click("#send")
    page.wait_for_function("document.getElementById('output').textContent.split(' ').length > 5")
    page.click("#stop")
    page.wait_for_function("document.getElementById('finish').textContent === 'cancelled'", timeout=3000)
    shown = page.text_content("#output")
    assert shown and prompt.startswith(shown) and len(shown) < len(prompt)
    assert gateway.gateway.metrics.streams.get(("echo", "cancelled"), 0) >= 1


def test_the_page_offers_the_backends_the_server_has_configured(page: Any, gateway: Served) -> None:
    page.goto(gateway.url + "/")
    page.wait_for_function("document.querySelectorAll('#backend option').length > 1")
    options = page.eval_on_selector_all("#backend option", "options => options.map(o => [o.value, o.textContent])")
    assert options == [["", "server default (echo)"], ["echo", "echo (echo-1)"], ["openai", "openai (gpt-4o-mini)"],
                       ["ollama", "ollama (llama3.2)"]]  # fmt: skip


def test_stop_before_the_first_token_cancels_the_generation(page: Any, thinking: tuple[Served, FakeUpstream]) -> None:
    served, upstream = thinking
    page.goto(served.url + "/")
    page.select_option("#backend", "openai")
    since = len(upstream.seen)
    page.click("#send")
    assert upstream.wait_for(lambda: len(upstream.seen) > since, 10)  # the upstream is thinking
    page.click("#stop")
    page.wait_for_function("document.getElementById('finish').textContent === 'cancelled'")
    assert page.text_content("#output") == "" and page.text_content("#error") == ""
    seen = upstream.seen[since]
    assert upstream.wait_for(lambda: seen.closed_by_client is not None, 10)  # the upstream request was closed
    assert served.gateway.metrics.streams[("openai", "cancelled")] >= 1 and served.gateway.metrics.active == 0


def test_a_refused_stream_shows_the_servers_own_message(page: Any, thinking: tuple[Served, FakeUpstream]) -> None:
    served, _ = thinking
    with httpx.Client(timeout=10) as client, client.stream("GET", served.url + "/chat/stream?prompt=hold") as held:
        assert held.status_code == 200 and served.gateway.metrics.active == 1  # the one slot is taken
        page.goto(served.url + "/")
        page.click("#send")
        page.wait_for_function("document.getElementById('error').textContent !== ''")
        assert page.text_content("#error").startswith("overloaded: ")
        assert "at its limit of 1 streams" in page.text_content("#error")
        assert page.text_content("#finish") == "-" and page.is_enabled("#send")
        assert served.gateway.metrics.active == 1  # asking again for the message started nothing


def test_an_error_event_is_shown_on_the_page(page: Any, gateway: Served) -> None:
    page.goto(gateway.url + "/")
    page.select_option("#backend", "openai")
    page.click("#send")
    page.wait_for_function("document.getElementById('finish').textContent === 'error'")
    assert page.text_content("#error").startswith("upstream_error: ")
    assert "Incorrect API key" in page.text_content("#error")


COLLECT = """(url) => new Promise((resolve) => {
    const result = {tokens: [], ids: [], opens: 0, errors: 0, openings: []};
    const source = new EventSource(url);
    source.onopen = () => { result.opens += 1; };
    source.addEventListener("stream", (e) => { result.openings.push(e.lastEventId); });
    source.addEventListener("token", (e) => { result.tokens.push(e.data); result.ids.push(e.lastEventId); });
    source.addEventListener("done", (e) => { result.done = e.data; source.close(); resolve(result); });
    source.addEventListener("error", (e) => {
        if (e.data !== undefined) { result.error = e.data; return; }
        result.errors += 1;
        if (source.readyState === EventSource.CLOSED) { resolve(result); }
    });
    setTimeout(() => { source.close(); result.timedOut = true; resolve(result); }, 20000);
})"""


def test_eventsource_resumes_a_cut_stream_with_nothing_missing_and_nothing_twice(page: Any, gateway: Served) -> None:
    words = [f"w{i}" for i in range(60)]  # 3 s at 0.05 s a token
    prompt = " ".join(words)
    port = int(gateway.url.rsplit(":", 1)[1])
    proxy = RandomCuttingProxy(port, cuts=2, low=700, high=700, seed=0)  # mid-event, twice
    try:
        page.goto(f"http://127.0.0.1:{proxy.port}/")
        result = page.evaluate(COLLECT, f"/chat/stream?backend=echo&prompt={'%20'.join(words)}")
    finally:
        proxy.close()
    assert proxy.cuts == 2, "the proxy did not cut the stream"
    assert not result.get("timedOut") and result["done"] == "stop", result
    assert result["opens"] == 3 and result["errors"] == 2  # two cuts, two reconnects
    assert "".join(result["tokens"]) == prompt
    positions = [int(i.rsplit(".", 1)[1]) for i in result["ids"]]
    assert positions == list(range(1, len(words) + 1))  # every event once, in order
    assert len({i.rsplit(".", 1)[0] for i in result["ids"]}) == 1  # one generation, not a restart
    assert result["openings"] == [result["ids"][0].rsplit(".", 1)[0] + ".0"]  # opened once: no reconnect moved the id back
