"""What a misbehaving upstream or a careless client puts in headers and error
bodies (issue 23, findings 3, 6 and 8): any Retry-After is a bounded number
or none on both routes, a provider key echoed in any case or inside any JSON
value is redacted, HEAD answers every GET route that can answer without
starting work, and `Origin: null` is never an allowed origin."""

from __future__ import annotations

import math
from email.utils import formatdate
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import providers
from asgi_stream import Gateway
from providers import parse_retry_after
from tests.faultkit import assert_no_secret
from tests.test_inprocess import ENV, request, sse_events
from tests.test_openai_inprocess import completion
from tests.upstream import FakeUpstream, Reply

PROVIDER_KEY = "sk-provider-SECRET-51d2"
DAY = 86400.0

# --- Retry-After: every value is bounded or none --------------------------------------------

numbers = st.floats() | st.integers(-(10**30), 10**30) | st.sampled_from([math.inf, -math.inf, math.nan, 1e309, 1e20, -0.0])
digit_strings = st.builds(lambda sign, n, tail: sign + "1" + "0" * n + tail, st.sampled_from(["", "-", "+"]),
                          st.integers(0, 400), st.sampled_from(["", ".5", "e3", "e308", "e-400"]))  # fmt: skip
years = st.integers(0, 100_000).map(str) | st.sampled_from(["1", "0001", "9999"])
dates = st.builds(lambda year, rest: f"Fri, 31 Dec {year} {rest}", years,
                  st.sampled_from(["23:59:59 GMT", "23:59:59 -0000", "23:59:59 +2359", "25:61:61 GMT", "23:59:59"]))  # fmt: skip
real_dates = st.floats(-6.2e10, 2.5e11).map(lambda at: formatdate(at, usegmt=True))
values = (numbers.map(str) | digit_strings | dates | real_dates | st.text(max_size=40)
          | st.sampled_from(["inf", "-inf", "Infinity", "nan", "NaN", "1e309", "-1e309", "0x10", "1_000", " 5 ", "٣", ""]))  # fmt: skip


@given(st.dictionaries(st.sampled_from(["retry-after", "retry-after-ms"]), values))
@example({"retry-after": "inf"})
@example({"retry-after-ms": "1e309"})
@example({"retry-after": "nan"})
@example({"retry-after": "1" + "0" * 19})
@example({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"})
def test_any_retry_after_is_a_bounded_number_of_seconds_or_none(headers: dict[str, str]) -> None:
    seconds = parse_retry_after(headers)
    assert seconds is None or (type(seconds) is float and 0 <= seconds <= DAY)


def test_the_retry_after_cap_is_a_day_and_an_absurd_value_is_capped_not_dropped() -> None:
    assert getattr(providers, "MAX_UPSTREAM_RETRY_AFTER", None) == DAY
    assert parse_retry_after({"retry-after": "1" + "0" * 19}) == DAY
    assert parse_retry_after({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}) == DAY
    assert parse_retry_after({"retry-after-ms": "nan", "retry-after": "7"}) == 7.0  # an unreadable ms value falls back
    assert parse_retry_after({"retry-after": "nan"}) is None


HOSTILE_RETRY_AFTER = [
    {"retry-after": "inf"}, {"retry-after": "-inf"}, {"retry-after-ms": "1e309"}, {"retry-after": "nan"},
    {"retry-after": "-5"}, {"retry-after": "1" + "0" * 19}, {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"},
    {"retry-after": "Mon, 01 Jan 0001 00:00:00 GMT"}, {"retry-after": "Fri, 31 Dec 99999 23:59:59 GMT"},
    {"retry-after": "soon, maybe"},
]  # fmt: skip
UPSTREAM_ENV = {**ENV, "API_KEYS": "a:k", "OPENAI_API_KEY": PROVIDER_KEY, "FIRST_TOKEN_TIMEOUT_SECONDS": "3"}


async def through_both_routes(reply: Reply) -> tuple[Any, Any]:
    """The /v1 answer and the /chat/stream answer of a gateway whose openai backend answers `reply`."""
    with FakeUpstream(lambda seen: reply) as upstream:
        app = Gateway({**UPSTREAM_ENV, "OPENAI_BASE_URL": upstream.url + "/v1"})
        try:
            v1 = await request(app, "POST", "/v1/chat/completions", **completion("hi", model="openai/m", stream=True))
            ours = await request(app, "GET", "/chat/stream", "prompt=hi&backend=openai", headers=[("authorization", "Bearer k")])
        finally:
            await app.aclose()
    return v1, ours


def error_event(ex: Any) -> dict[str, Any]:
    events = sse_events(ex.body)
    assert [name for name, _, _ in events[-2:]] == ["error", "done"], events
    return dict(orjson.loads(events[-2][1]))


@pytest.mark.anyio
@pytest.mark.parametrize("status", [429, 400])
@pytest.mark.parametrize("headers", HOSTILE_RETRY_AFTER)
async def test_a_hostile_upstream_retry_after_is_bounded_on_both_routes(status: int, headers: dict[str, str]) -> None:
    body = orjson.dumps({"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}})
    v1, ours = await through_both_routes(Reply(status, "application/json", [body], headers))
    assert v1.status == status and orjson.loads(v1.body)["error"]["message"] == "slow down"
    if "retry-after" in v1.headers:
        assert v1.headers["retry-after"].isdigit() and int(v1.headers["retry-after"]) <= DAY
    error = error_event(ours)
    assert error["status"] == status
    assert "retry_after" not in error or 0 <= error["retry_after"] <= DAY


# --- provider keys echoed in any case, inside any JSON value ---------------------------------


@pytest.mark.anyio
async def test_a_provider_key_echoed_in_any_case_or_json_value_is_redacted_on_both_routes() -> None:
    upper, mixed = PROVIDER_KEY.upper(), PROVIDER_KEY.swapcase()
    error = {"message": f"bad key {upper}", "type": f"no {mixed}",
             "code": {"k": PROVIDER_KEY, "list": [upper, 1, None, {"deep": f"x{mixed}x"}], PROVIDER_KEY: upper}}  # fmt: skip
    v1, ours = await through_both_routes(Reply(401, "application/json", [orjson.dumps({"error": error})]))
    got = orjson.loads(v1.body)["error"]
    assert v1.status == 502 and got["message"] == "bad key [redacted]"
    assert got["code"] == {"k": "[redacted]", "list": ["[redacted]", 1, None, {"deep": "x[redacted]x"}], "[redacted]": "[redacted]"}
    event = error_event(ours)
    assert (event["message"], event["upstream_type"], event["code"]) == ("bad key [redacted]", "no [redacted]", got["code"])
    for ex in (v1, ours):
        assert_no_secret(ex.body.decode().lower() + orjson.dumps(ex.headers).decode().lower(), PROVIDER_KEY.lower())


# --- HEAD, and Origin: null -----------------------------------------------------------------

AUTH = [("authorization", "Bearer k")]


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/", "/healthz", "/backends", "/metrics", "/v1/models"])
async def test_head_answers_every_get_route_like_get_without_a_body(path: str) -> None:
    app = Gateway({**ENV, "API_KEYS": "a:k"})
    got = await request(app, "GET", path, headers=AUTH)
    head = await request(app, "HEAD", path, headers=AUTH)
    assert (head.status, head.body) == (200, b"") and got.status == 200 and got.body
    if path == "/metrics":  # the counts move between the two requests
        assert head.headers["content-type"] == got.headers["content-type"] and int(head.headers["content-length"]) > 0
    else:
        assert head.headers == got.headers
    assert (await request(app, "HEAD", path)).status == (401 if path in ("/backends", "/metrics", "/v1/models") else 200)
    await app.aclose()


@pytest.mark.anyio
async def test_head_does_not_start_a_stream_and_405s_list_head_where_allowed() -> None:
    app = Gateway(ENV)
    head = await request(app, "HEAD", "/chat/stream", "prompt=hi")
    assert head.status == 405 and head.headers["allow"] == "GET, POST"
    assert app.metrics.active == 0 and not app.metrics.streams
    refused = await request(app, "POST", "/healthz")
    assert refused.status == 405 and refused.headers["allow"] == "GET, HEAD"
    await app.aclose()


@pytest.mark.anyio
async def test_origin_null_is_not_allowed_by_a_star() -> None:
    app = Gateway({**ENV, "CORS_ORIGINS": "*"})
    for origin, allowed in [("null", False), ("NULL", False), ("https://z.example", True)]:
        ex = await request(app, "GET", "/chat/stream", "prompt=x", headers=[("Origin", origin)])
        refused = await request(app, "GET", "/nope", headers=[("Origin", origin)])
        preflight = await request(app, "OPTIONS", "/chat/stream", headers=[("Origin", origin)])
        assert (ex.status, refused.status, preflight.status) == (200, 404, 204 if allowed else 403)
        for answer in (ex, refused, preflight):
            assert answer.headers.get("access-control-allow-origin") == (origin if allowed else None)
    await app.aclose()
