"""The upstream fault table again, with the gateway on trio (in-process,
through httpx.ASGITransport, which is enough for an answer that ends): the
same error, deadline, retries and usage row as on uvicorn's asyncio. Trio's
clock has another origin than time.monotonic(), so a deadline taken from the
wrong clock shows up here."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import asgi_stream
from tests.faultkit import _pools, internal, usage_rows
from tests.test_faults_upstream import BASE, FAULT_PROMPT, FAULTS, KEY, OK_PROMPT, SLACK, _base_url, fault_responder
from tests.upstream import FakeUpstream


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


def sse_events(text: str) -> list[tuple[str, str]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = [line.split(": ", 1) for line in block.split("\n") if ": " in line]
        named = dict(fields)
        if "event" in named:
            events.append((named["event"], "\n".join(v for k, v in fields if k == "data")))
    return events


# httpx and httpcore iterate response bodies with nested async generators and
# do not close them when the consumer stops early (encode/httpx#3686, open):
# trio's finalizer closes them and warns. The connection itself is closed by
# response.aclose() (asserted below through the pool and the fake upstream).
HTTPX_ABANDONED_GENERATORS = r"ignore:Async generator '(httpx|httpcore)\._:ResourceWarning"


@pytest.mark.anyio
@pytest.mark.filterwarnings(HTTPX_ABANDONED_GENERATORS)
@pytest.mark.parametrize("name", FAULTS)
async def test_upstream_fault_on_trio_ends_as_on_asyncio(name: str, tmp_path: Path) -> None:
    fault = FAULTS[name]
    db = tmp_path / "usage.db"

    with FakeUpstream(fault_responder(fault)) as upstream, _base_url(fault, upstream) as base_url:
        env = {
            **BASE,
            **fault.env,
            "OPENAI_API_KEY": KEY,
            "OPENAI_BASE_URL": base_url,
            "USAGE_DB": str(db),
            "RESUME_GRACE_SECONDS": "0",
        }
        gateway = asgi_stream.Gateway(env)
        attempts: list[httpx.Request] = []

        async def count(request: httpx.Request) -> None:
            attempts.append(request)

        gateway.start().http.event_hooks["request"].append(count)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gateway", timeout=30) as client:
            with anyio.fail_after(fault.within + SLACK + 10):
                started = anyio.current_time()
                response = await client.post("/chat/stream", json={"messages": [{"role": "user", "content": FAULT_PROMPT}]})
                elapsed = anyio.current_time() - started
            events = sse_events(response.text)
            assert response.status_code == 200 and [e for e, _ in events[-2:]] == ["error", "done"] and events[-1][1] == "error"
            error = json.loads(events[-2][1])
            assert (error["type"], error.get("status"), error.get("retry_after")) == (
                fault.error_type,
                fault.status,
                fault.retry_after,
            )
            assert fault.message in error["message"]
            tokens = sum(e == "token" for e, _ in events)
            assert tokens >= 1 if fault.tokens == -1 else tokens == fault.tokens
            assert fault.not_before <= elapsed < fault.within + SLACK, f"done after {elapsed:.2f} s"
            assert len(attempts) == fault.attempts
            if fault.hangup:
                assert upstream.wait_for(lambda: upstream.open_connections == 0, 30)

            ok_body: dict[str, Any] = {"messages": [{"role": "user", "content": OK_PROMPT}]}
            if fault.address != "fake":
                ok_body["backend"] = "echo"
            ok = await client.post("/chat/stream", json=ok_body)
            assert sse_events(ok.text)[-1] == ("done", "stop")
        assert gateway.metrics.active == 0 and gateway.start().admission.unaccounted == 0
        assert all(internal(pool, "_requests", "httpcore") == [] for pool in _pools(gateway))
        await gateway.aclose()
        gc.collect()  # finalize abandoned generators while the filter above is in force
    rows = usage_rows(db)
    assert sorted((row["finish_reason"], row["error_type"]) for row in rows) == [("error", fault.error_type), ("stop", None)]
