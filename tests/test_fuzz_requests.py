"""Request parsing under fuzzing and hostile hand-written cases: every request
is either a valid ChatRequest or a 4xx that names what is wrong; never an
exception, never a 5xx, never a hang. In-process (parse_chat_request), through
the ASGI app on asyncio and trio (httpx.ASGITransport), and through uvicorn."""

from __future__ import annotations

import json
import re
from typing import Any

import anyio
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import asgi_stream
from asgi_stream_core import config
from asgi_stream_core.chat_request import ROLES, parse_chat_request
from asgi_stream_core.config import BACKENDS
from asgi_stream_core.types import Refusal
from providers import ChatRequest
from tests.faultkit import serve_probed

CONFIG = config.load_config({"OPENAI_API_KEY": "sk-fuzz-SECRET", "MAX_TOKENS_LIMIT": "4096"})

# Every JSON value orjson can write (its integers are at most 64 bits).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=25
)

# Bodies shaped like requests, each field either plausible or anything at all,
# so that the fuzzer reaches the checks behind `messages`.
roles = st.sampled_from(ROLES) | json_values
message = st.fixed_dictionaries({}, optional={"role": roles, "content": st.text(max_size=60) | json_values, "name": json_values})
valid_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=60)}), min_size=1, max_size=4
)
messages = st.one_of(valid_messages, valid_messages, st.lists(message | json_values, max_size=4), json_values)
model_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._\-:/@+]{0,20}", fullmatch=True)
near_valid = st.fixed_dictionaries(
    {"messages": messages},
    optional={
        "backend": st.one_of(st.sampled_from([*BACKENDS, *BACKENDS, "ollama", "ECHO", ""]), json_values),
        "model": st.one_of(model_names, model_names, st.text(max_size=300), json_values),
        "max_tokens": st.one_of(st.integers(1, 4096), st.integers(-5, 5000), json_values),
        "temperature": st.one_of(st.floats(0, 2), st.floats(-1, 3), json_values),
        "stream": json_values,
    },
)
bodies = st.one_of(near_valid, near_valid, near_valid, json_values, valid_messages, st.lists(message, min_size=1, max_size=3))
NUMERIC_FIELDS = ["max_tokens", "temperature"]


def check_parsed(request: ChatRequest) -> None:
    """A request that passed validation satisfies every rule of docs/design.md."""
    assert request.messages and all(set(m) == {"role", "content"} for m in request.messages)
    assert all(m["role"] in ROLES and isinstance(m["content"], str) for m in request.messages)
    assert request.backend in CONFIG.upstreams
    assert BACKENDS[request.backend].model_pattern.fullmatch(request.model)
    assert type(request.max_tokens) is int and 1 <= request.max_tokens <= CONFIG.max_tokens_limit
    assert request.temperature is None or (type(request.temperature) is float and 0 <= request.temperature <= 2)


MESSAGE_LIMIT = 300  # a refusal quotes at most a short prefix of what it refuses
OPTIONAL_FIELDS = ("backend", "model", "max_tokens", "temperature")
SUBJECTS = (*OPTIONAL_FIELDS, "messages", "the request body", "the body", "give prompt or messages", "prompt (or messages")


def subject_of(message: str) -> str:
    """What a refusal says is wrong: the field (or the body) it starts with."""
    subject = next((s for s in SUBJECTS if re.match(re.escape(s) + r"\b", message)), None)
    assert subject is not None, f"a refusal that names nothing: {message!r}"
    return subject


def without(name: str, query: dict[str, str], body: bytes) -> tuple[dict[str, str], bytes]:
    """The request with field `name` left out (its default then applies)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    present = name in query or (isinstance(data, dict) and data.get(name) is not None)
    assert present, f"the refusal names {name}, which the request does not set"
    if isinstance(data, dict):
        body = orjson.dumps({k: v for k, v in data.items() if k != name})
    return {k: v for k, v in query.items() if k != name}, body


def parse_or_refusal(method: str, query: dict[str, str], body: bytes) -> ChatRequest | Refusal:
    try:
        request = parse_chat_request(method, query, body, CONFIG)
    except Refusal as refusal:
        assert (refusal.status, refusal.type) == (400, "invalid_request")
        assert len(refusal.message) <= MESSAGE_LIMIT, (len(refusal.message), refusal.message[:100])
        subject = subject_of(refusal.message)
        if subject in OPTIONAL_FIELDS:  # it names what is wrong: without that field, that refusal goes
            try:
                parse_chat_request(method, *without(subject, query, body), CONFIG)
            except Refusal as next_refusal:
                assert subject_of(next_refusal.message) != subject, (refusal.message, next_refusal.message)
        event(f"refused: {subject}")
        return refusal
    check_parsed(request)
    event("valid request")
    return request


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_any_json_body_parses_to_a_valid_request_or_a_400_naming_the_field(body: Any) -> None:
    parse_or_refusal("POST", {}, orjson.dumps(body))


# Valid messages and a few optional fields near and past their limits, so that
# most refusals come from the optional fields (the broad fuzzers above mostly
# stop at `messages`).
optional_fields = st.fixed_dictionaries(
    {"messages": valid_messages},
    optional={
        "backend": st.sampled_from([*BACKENDS, "echo", "ECHO", "ollama"]),
        "model": st.one_of(model_names, st.sampled_from(["-x", "a b", "x" * 300])),
        "max_tokens": st.integers(-5, 5000) | st.sampled_from([0, 4096, 4097, 2**63 - 1]),
        "temperature": st.floats(-1, 3) | st.sampled_from([0, 2, 2.0001, -0.0001]),
    },
)


@settings(max_examples=400, deadline=None)
@given(optional_fields)
def test_a_refusal_of_an_optional_field_names_the_field_whose_removal_lifts_it(body: dict[str, Any]) -> None:
    parse_or_refusal("POST", {}, orjson.dumps(body))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_as_a_body_parse_or_get_a_400(body: bytes) -> None:
    parse_or_refusal("POST", {}, body)



# Long digit strings, the class of input that once got a 500 (int() refuses
# more than 4,300 digits) and a refusal repeating every digit: some short of
# the limit, some past it, some with a sign, a point or an exponent.
long_digits = st.builds(
    lambda digit, count, tail, prefix, suffix: prefix + digit * count + tail + suffix,
    st.sampled_from("0123456789"),
    st.sampled_from([15, 19, 20, 21, 40, 300, 4299, 4300, 4301, 5000]) | st.integers(15, 6000),  # the limits here and in int()
    st.text("0123456789", max_size=5),
    st.sampled_from(["", "", "-", "0", "+"]),
    st.sampled_from(["", "", ".5", "e3", "e-400"]),
)
query_values = (
    st.text(max_size=30)
    | st.integers(-10, 10_000).map(str)
    | st.sampled_from(["nan", "inf", "-0", "1e3", "٣", "0x10", " 5"])
    | long_digits
)
queries = st.dictionaries(
    st.sampled_from(["prompt", "messages", "backend", "model", "max_tokens", "temperature", "access_token", "x"]),
    query_values | json_values.map(lambda v: orjson.dumps(v).decode()),
    max_size=6,
)


@settings(max_examples=800, deadline=None)
@given(queries, st.sampled_from(["GET", "POST"]), json_values)
def test_any_query_parses_to_a_valid_request_or_a_400_naming_the_field(query: dict[str, str], method: str, body: Any) -> None:
    parse_or_refusal(method, query, orjson.dumps(body))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(NUMERIC_FIELDS), long_digits, st.sampled_from(["body", "query", "both"]), st.sampled_from(["GET", "POST"]))
def test_long_digit_strings_in_any_numeric_field_get_a_short_400(field: str, digits: str, where: str, method: str) -> None:
    """In the body as a JSON number literal, in the query as text, or both."""
    query = {field: digits} if where != "body" else {}
    if method == "GET":
        query["prompt"] = "hi"
    body = raw_field(field, digits) if where != "query" else orjson.dumps(OK)
    parse_or_refusal(method, query, body)  # a valid request (a few such strings are small numbers) or a short 400


# --- hand-written hostile cases: (name, content type, raw body, expected status)

OK = {"messages": [{"role": "user", "content": "hi"}]}


def with_(**fields: Any) -> bytes:
    return orjson.dumps({**OK, **fields})


def raw_field(name: str, literal: str) -> bytes:
    return b'{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (name.encode(), literal.encode())


WRONG_TYPES: dict[str, list[Any]] = {
    "messages": ["hi", 1, None, True, {}, [], ["hi"], [None], [[]], {"role": "user", "content": "hi"}],
    "messages[0].role": ["robot", "", "USER", 1, None, ["user"], {"user": 1}, True],
    "messages[0].content": [1, 1.5, None, True, ["hi"], {"text": "hi"}],
    "backend": [1, True, ["echo"], {"echo": 1}, "nonexistent", "ollama"],
    "model": [1, True, ["m"], {"m": 1}, "-starts-with-dash", "has space", "x" * 257, "ünïcode", "a\nb", "a/../b\x00"],
    "max_tokens": ["64", 64.0, 1.5, True, False, 0, -1, 4097, [64], {"n": 64}, 2**63 - 1, -(2**63)],
    "temperature": ["0.5", True, [0.5], {"t": 1}, -0.001, 2.001, 1e308, -1e308],
}


def wrong_type_cases() -> list[tuple[str, bytes, str]]:
    cases = []
    for field, values in WRONG_TYPES.items():
        for value in values:
            if field.startswith("messages[0]."):
                inner = {"role": "user", "content": "hi", field.split(".")[1]: value}
                body = orjson.dumps({"messages": [inner]})
            else:
                body = orjson.dumps({**OK, field: value}) if field != "messages" else orjson.dumps({"messages": value})
            cases.append((f"{field}={json.dumps(value)[:30]}", body, field.split("[")[0]))
    return cases


HOSTILE: list[tuple[str, str | None, bytes, int]] = [
    ("empty body", "application/json", b"", 400),
    ("truncated JSON", "application/json", b'{"messages": [', 400),
    ("a JSON string", "application/json", b'"hi"', 400),
    ("a JSON number", "application/json", b"42", 400),
    ("null", "application/json", b"null", 400),
    ("nested arrays 2000 deep", "application/json", b"[" * 2000 + b"]" * 2000, 400),
    ("nested objects 100000 deep, unclosed", "application/json", b'{"a":' * 100_000, 400),
    ("messages nested 1100 deep", "application/json", b'{"messages": ' + b"[" * 1100 + b"]" * 1100 + b"}", 400),
    ("max_tokens 1e400 (too large for a float)", "application/json", raw_field("max_tokens", "1e400"), 400),
    *[
        (f"{name} nested 300 deep", "application/json", raw_field(name, "[" * 300 + "]" * 300), 400)
        for name in ("backend", "model", "max_tokens", "temperature")
    ],
    (
        "role nested 300 deep",
        "application/json",
        b'{"messages": [{"role": ' + b"[" * 300 + b"]" * 300 + b', "content": "hi"}]}',
        400,
    ),
    (
        "content nested 300 deep",
        "application/json",
        b'{"messages": [{"role": "user", "content": ' + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}]}",
        400,
    ),
    ("max_tokens -1e400", "application/json", raw_field("max_tokens", "-1e400"), 400),
    ("max_tokens 10**30 (too large for an int64)", "application/json", raw_field("max_tokens", "1" + "0" * 30), 400),
    ("max_tokens 2**64", "application/json", raw_field("max_tokens", "18446744073709551616"), 400),
    ("max_tokens a 5000-digit integer", "application/json", raw_field("max_tokens", "9" * 5000), 400),
    ("temperature 1e400", "application/json", raw_field("temperature", "1e400"), 400),
    ("temperature NaN literal", "application/json", raw_field("temperature", "NaN"), 400),
    ("temperature Infinity literal", "application/json", raw_field("temperature", "Infinity"), 400),
    ("temperature 1e-400 (underflows to 0)", "application/json", raw_field("temperature", "1e-400"), 200),
    ("lone high surrogate in content", "application/json", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400),
    ("lone low surrogate in content", "application/json", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400),
    ("lone surrogate in a key", "application/json", b'{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}', 400),
    ("lone surrogate in role", "application/json", b'{"messages": [{"role": "\\ud83d", "content": "hi"}]}', 400),
    ("a valid surrogate pair", "application/json", b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}', 200),
    ("bytes that are not UTF-8", "application/json", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ("CESU-8 surrogate bytes", "application/json", b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', 400),
    ("a NUL in content", "application/json", b'{"messages": [{"role": "user", "content": "a\\u0000b"}]}', 200),
    ("a UTF-8 BOM before the JSON", "application/json", b"\xef\xbb\xbf" + orjson.dumps(OK), 400),
    ("duplicate keys (last wins)", "application/json", b'{"messages": 1, "messages": [{"role": "user", "content": "hi"}]}', 200),
    ("trailing garbage", "application/json", orjson.dumps(OK) + b"garbage", 400),
    ("a backend whose key is not set", "application/json", with_(backend="openai"), 400),
    ("text/plain", "text/plain", orjson.dumps(OK), 415),
    ("no content type", None, orjson.dumps(OK), 415),
    ("form encoded", "application/x-www-form-urlencoded", b"messages=hi", 415),
    ("a +json type", "application/vnd.api+json", orjson.dumps(OK), 200),
    ("json with a charset", "application/json; charset=utf-8", orjson.dumps(OK), 200),
    *[(f"wrong type: {name}", "application/json", body, 400) for name, body, _ in wrong_type_cases()],
]


GET_CASES: list[tuple[str, str, int]] = [
    ("prompt and messages together", "prompt=hi&messages=%5B%5D", 400),
    ("neither prompt nor messages", "model=x", 400),
    ("messages that are not JSON", "messages=%5B", 400),
    ("messages with a lone surrogate", "messages=" + "%5B%7B%22role%22%3A%22user%22%2C%22content%22%3A%22%5Cud800%22%7D%5D", 400),
    ("max_tokens not digits", "prompt=hi&max_tokens=1e3", 400),
    ("max_tokens in Arabic-Indic digits", "prompt=hi&max_tokens=%D9%A3", 400),
    ("max_tokens negative", "prompt=hi&max_tokens=-1", 400),
    ("max_tokens huge", "prompt=hi&max_tokens=" + "9" * 400, 400),
    ("temperature nan", "prompt=hi&temperature=nan", 400),
    ("temperature inf", "prompt=hi&temperature=inf", 400),
    ("temperature not a number", "prompt=hi&temperature=warm", 400),
    ("a prompt of invalid UTF-8 (replaced)", "prompt=%FF%FE", 200),
    ("a prompt of CESU-8 surrogates (replaced)", "prompt=%ED%A0%80", 200),
    ("an empty prompt", "prompt=", 200),
]


def assert_answer(status: int, content_type: str, body: bytes, expected: int, name: str) -> None:
    assert status == expected, (name, status, body[:300])
    if status >= 400:
        error = orjson.loads(body)["error"]
        assert set(error) == {"type", "message"} and error["message"], name
    else:
        assert content_type.startswith("text/event-stream") and body.rstrip().endswith((b"data: stop", b"data: length")), (
            name,
            body[-200:],
        )


def _headers(content_type: str | None) -> dict[str, str]:
    return {"content-type": content_type} if content_type is not None else {}


@pytest.mark.anyio
async def test_hostile_requests_get_their_4xx_through_the_asgi_app() -> None:
    gateway = asgi_stream.Gateway({"RESUME_TTL_SECONDS": "0", "USAGE_DB": "", "MAX_TOKENS_LIMIT": "4096", "ECHO_DELAY_SECONDS": "0"})
    transport = httpx.ASGITransport(app=gateway)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        with anyio.fail_after(60):
            for name, content_type, body, expected in HOSTILE:
                response = await client.post("/chat/stream", content=body, headers=_headers(content_type))
                assert_answer(response.status_code, response.headers.get("content-type", ""), response.content, expected, name)
            for name, query, expected in GET_CASES:
                response = await client.get("/chat/stream?" + query)
                assert_answer(response.status_code, response.headers.get("content-type", ""), response.content, expected, name)
    assert gateway.metrics.active == 0


def test_hostile_requests_get_their_4xx_through_uvicorn() -> None:
    with serve_probed({"MAX_TOKENS_LIMIT": "4096"}) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        for name, content_type, body, expected in HOSTILE:
            response = client.post("/chat/stream", content=body, headers=_headers(content_type))
            assert_answer(response.status_code, response.headers.get("content-type", ""), response.content, expected, name)
        for name, query, expected in GET_CASES:
            response = client.get("/chat/stream?" + query)
            assert_answer(response.status_code, response.headers.get("content-type", ""), response.content, expected, name)
        client.close()
        gw.nothing_left()


@pytest.mark.parametrize(("name", "body", "field"), wrong_type_cases())
def test_a_wrong_type_is_refused_with_a_message_naming_the_field(name: str, body: bytes, field: str) -> None:
    with pytest.raises(Refusal) as refusal:
        parse_chat_request("POST", {}, body, CONFIG)
    assert refusal.value.status == 400 and field in refusal.value.message, refusal.value.message


# --- fuzzing through the ASGI app, on asyncio and trio

ASGI_GATEWAY_ENV = {"RESUME_TTL_SECONDS": "0", "USAGE_DB": "", "MAX_TOKENS_LIMIT": "4096", "ECHO_DELAY_SECONDS": "0"}


@pytest.mark.anyio
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies, content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"]))
async def test_fuzzed_bodies_through_the_asgi_app_get_a_stream_or_a_4xx(body: Any, content_type: str) -> None:
    gateway = asgi_stream.Gateway(ASGI_GATEWAY_ENV)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gateway") as client:
        with anyio.fail_after(10):
            response = await client.post("/chat/stream", content=orjson.dumps(body), headers={"content-type": content_type})
    assert response.status_code in (200, 400, 415), response.content[:300]
    event(f"HTTP {response.status_code}")
    if content_type == "text/plain":
        assert response.status_code == 415
    if response.status_code == 200:
        assert response.content.rstrip().endswith((b"data: stop", b"data: length"))
        assert b"event: error" not in response.content
    else:
        assert orjson.loads(response.content)["error"]["message"]
    assert gateway.metrics.active == 0


# --- fuzzing the ASGI scope itself: what a lenient server might pass through

LATIN1 = st.text(st.characters(codec="latin-1"), max_size=40)
header_values = {
    b"content-type": st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "text/plain", "", "application/+json"]
    )
    | LATIN1,
    b"content-length": st.sampled_from(["0", "2", "-1", "1e3", " 12", "²", "١٢", "99999999999999999999999", "0x10", ""])
    | LATIN1
    | long_digits,
    b"authorization": st.sampled_from(["Bearer key-a", "bearer key-a", "Bearer ", "Basic a2V5LWE=", "Bearer key-a\x00"]) | LATIN1,
    b"last-event-id": st.sampled_from(["", ".", "x.1", "x.-1", "x.²", "x." + "9" * 50, "\xff.1"]) | LATIN1 | long_digits.map("x.".__add__),
    b"origin": st.sampled_from(["https://ok.example", "null", "https://evil.example"]) | LATIN1,
    b"x-other": LATIN1,
}


def header_bytes(value: str) -> bytes:
    """Latin-1 where it can be (servers decode headers so), else UTF-8."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode()


scope_headers = st.lists(
    st.sampled_from(list(header_values)).flatmap(lambda name: st.tuples(st.just(name), header_values[name].map(header_bytes))),
    max_size=6,
)
paths = st.sampled_from(["/chat/stream", "/chat/stream/", "/chat/stream/abc", "/", "/healthz", "/metrics", "/nope"]) | st.text(
    max_size=30
).map(lambda p: "/" + p)
methods = st.sampled_from(["GET", "POST", "DELETE", "OPTIONS", "PUT", "HEAD", "PATCH"]) | st.text(max_size=8)
query_strings = st.binary(max_size=60) | queries.map(
    lambda q: "&".join(f"{k}={v}" for k, v in q.items()).encode("utf-8", "surrogatepass")
)
deep = st.integers(200, 1100).map(lambda depth: "[" * depth + "]" * depth)
deep_bodies = st.builds(
    raw_field, st.sampled_from(["backend", "model", "max_tokens", "temperature", "messages", "other"]), deep
) | st.builds(
    lambda field, nested: b'{"messages": [{"role": "user", "content": "hi", "%s": %s}]}' % (field.encode(), nested.encode()),
    st.sampled_from(["role", "content", "name"]),
    deep,
)
raw_bodies = st.binary(max_size=100) | bodies.map(orjson.dumps) | deep_bodies


async def call_app(app: asgi_stream.Gateway, scope: dict[str, Any], body: bytes) -> list[dict[str, Any]]:
    """One request straight into the ASGI callable; the client never leaves."""
    sent: list[dict[str, Any]] = []
    pieces = [body[:7], body[7:]] if len(body) > 7 else [body]
    never = anyio.Event()

    async def receive() -> dict[str, Any]:
        if pieces:
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(10):
        await app(scope, receive, send)
    return sent


@pytest.mark.anyio
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    method=st.one_of(st.just("POST"), st.just("POST"), st.just("GET"), methods),
    path=st.one_of(st.just("/chat/stream"), st.just("/chat/stream"), paths),
    query=query_strings,
    headers=scope_headers,
    body=raw_bodies,
)
async def test_any_scope_gets_a_complete_answer_below_500(
    method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    app = asgi_stream.Gateway({**ASGI_GATEWAY_ENV, "API_KEYS": "a:key-a", "CORS_ORIGINS": "https://ok.example"})
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode("utf-8", "surrogatepass"), "query_string": query,
             "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer key-a"), *headers]}  # fmt: skip
    sent = await call_app(app, scope, body)
    start = sent[0]
    assert start["type"] == "http.response.start" and 100 <= start["status"] < 500, (start, sent[1:2])
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body", False)
    if method == "HEAD":  # GET's answer without its body, refusals included
        assert all(m.get("body", b"") == b"" for m in sent[1:])
    elif start["status"] >= 400:
        assert len(orjson.loads(sent[1]["body"])["error"]["message"]) <= MESSAGE_LIMIT
    event(f"HTTP {start['status']}")
    assert app.metrics.active == 0


@settings(max_examples=200, deadline=None)
@given(deep_bodies)
def test_values_nested_deeper_than_orjson_writes_parse_or_get_a_400_naming_the_field(body: bytes) -> None:
    """orjson reads 1024 levels but writes only 254: a refusal that quotes
    the offending value must not fail on writing it (unknown fields are ignored)."""
    outcome = parse_or_refusal("POST", {}, body)
    if b'"other"' not in body and b'"name"' not in body:
        assert isinstance(outcome, Refusal)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("declared", "status"), [("²", 200), ("¹²", 200), ("-1", 200), ("1e3", 200), (" 12", 200), ("99999999999999999999999", 413)]
)
async def test_a_content_length_of_other_than_ascii_digits_is_not_trusted_and_never_a_500(declared: str, status: int) -> None:
    """uvicorn's h11 refuses such a header itself; a more lenient server may pass it on."""
    app = asgi_stream.Gateway(ASGI_GATEWAY_ENV)
    headers = [(b"content-type", b"application/json"), (b"content-length", declared.encode("latin-1"))]
    scope = {"type": "http", "method": "POST", "path": "/chat/stream", "query_string": b"", "headers": headers}
    sent = await call_app(app, scope, orjson.dumps(OK))
    assert sent[0]["status"] == status


@pytest.mark.anyio
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(position=long_digits | st.integers(0, 10**30).map(str), header=st.sampled_from([b"last-event-id", b"Last-Event-ID"]))
async def test_a_resume_of_a_live_stream_at_any_position_is_answered_below_500(position: str, header: bytes) -> None:
    """Last-Event-ID names a stream that exists, so the position is read: a
    long digit string must not reach int() unbounded."""
    app = asgi_stream.Gateway({**ASGI_GATEWAY_ENV, "RESUME_TTL_SECONDS": "60"})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        with anyio.fail_after(30):
            first = await client.get("/chat/stream?prompt=one%20two")
            stream_id = first.headers["x-stream-id"]
            resumed = await client.get("/chat/stream", headers={header.decode(): f"{stream_id}.{position}"})
    assert resumed.status_code in (200, 204), resumed.content[:200]
    if position.isdigit() and len(position) <= 20 and int(position) < 4:  # one two: two tokens, usage and done
        assert resumed.status_code == 200  # a position the record holds is replayed
    event(f"HTTP {resumed.status_code}")


DEEP = "[" * 300 + "0" + "]" * 300  # orjson reads it (1,024 levels) but does not write it (254): it cannot go upstream
TOOL = '{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "x": ' + DEEP + "}}}"
HI = '"messages": [{"role": "user", "content": "hi"}]'
NESTED_TOO_DEEP = [
    ("/chat/stream", '{"backend": "openai", ' + HI + ', "tools": [' + TOOL + "]}"),
    ("/chat/stream", '{"backend": "openai", ' + HI + ', "response_format": {"type": "json_schema", "json_schema": '
                     '{"name": "a", "schema": {"x": ' + DEEP + "}}}}"),
    ("/v1/chat/completions", '{"model": "openai/m", ' + HI + ', "tools": [' + TOOL + "]}"),
    ("/v1/responses", '{"model": "openai/m", "input": "hi", "tools": [{"type": "function", "name": "f", '
                      '"parameters": {"type": "object", "x": ' + DEEP + "}}]}"),
    ("/v1/messages", '{"model": "openai/m", "max_tokens": 9, ' + HI + ', "tools": [{"name": "f", '
                     '"input_schema": {"type": "object", "x": ' + DEEP + "}}]}"),
]  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "body"), NESTED_TOO_DEEP, ids=["tools", "response_format", "v1 chat", "v1 responses", "v1 messages"])
async def test_a_request_nesting_json_deeper_than_can_be_forwarded_is_a_400_before_any_upstream_call(path: str, body: str) -> None:
    # the upstream's address takes no connection: were it called, the answer would be upstream_unavailable
    app = asgi_stream.Gateway({"USAGE_DB": "", "OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"content-type", b"application/json")]}  # fmt: skip
    sent = await call_app(app, scope, body.encode())
    assert sent[0]["status"] == 400, sent[:2]
    error = orjson.loads(sent[1]["body"])["error"]
    assert error["message"] == "the request nests JSON deeper than 254 levels, which cannot be sent upstream"
    await app.aclose()
