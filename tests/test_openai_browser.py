"""The `openai` npm package in a real browser (Debian's headless Chromium),
loaded from another origin than the gateway's: the CORS preflight must allow
the SDK's own headers, and streams, answers and errors must be readable."""

from __future__ import annotations

import functools
import http.server
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Served, serve
from tests.servers import require_program
from tests.test_browser import CHROMIUM_ARGS

SDK = Path(__file__).with_name("node") / "node_modules" / "openai"
PAGE_SCRIPT = """async ([baseURL, apiKey]) => {
  const { default: OpenAI } = await import("/openai/index.mjs");
  const client = new OpenAI({ baseURL, apiKey, dangerouslyAllowBrowser: true, maxRetries: 0 });
  const messages = [{ role: "user", content: "from the browser" }];
  const out = { text: "" };
  try {
    const stream = await client.chat.completions.create({ model: "echo/echo", messages, stream: true });
    for await (const chunk of stream) out.text += chunk.choices[0]?.delta?.content ?? "";
    out.whole = (await client.chat.completions.create({ model: "echo/echo", messages })).choices[0].message.content;
    await client.chat.completions.create({ model: "echo/echo", messages, n: 2 });
  } catch (error) {
    out.error = [error.constructor.name, error.status ?? null, error.param ?? null];
  }
  return out;
}"""


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    """A page's origin: a static server with the SDK at /openai/."""
    if not SDK.exists():
        pytest.fail("needs `npm ci --prefix tests/node`")
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "openai").symlink_to(SDK.resolve())
        (Path(root) / "index.html").write_text("<!doctype html><title>SDK page</title>")
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
        handler.log_message = lambda *args: None  # type: ignore[attr-defined]
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def gateway(site: str) -> Iterator[Served]:
    with serve({"CORS_ORIGINS": site, "API_KEYS": "web:gw-web"}) as served:
        yield served


@pytest.fixture(scope="module")
def page(site: str) -> Iterator[Any]:
    executable = require_program("chromium", "/usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(site + "/index.html")
            yield page
        finally:
            browser.close()


def test_the_openai_npm_package_streams_answers_and_raises_across_origins(page: Any, gateway: Served) -> None:
    result = page.evaluate(PAGE_SCRIPT, [gateway.url + "/v1", "gw-web"])
    assert result == {"text": "from the browser", "whole": "from the browser", "error": ["BadRequestError", 400, "n"]}


def test_a_wrong_key_is_an_authentication_error_the_page_can_read(page: Any, gateway: Served) -> None:
    result = page.evaluate(PAGE_SCRIPT, [gateway.url + "/v1", "wrong"])
    assert result == {"text": "", "error": ["AuthenticationError", 401, None]}
