"""Secrets and stream ownership: provider and client keys never reach a
response or a log line, stream ids are unguessable, and a stream belongs to
the key that started it (another key can neither resume nor cancel it)."""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import stream
from tests.faultkit import assert_no_secret, serve_probed
from tests.upstream import FakeUpstream, Reply

PROVIDER_KEY = "sk-provider-SECRET-51d2"
ALICE, BOB = "alice-key-SECRET-0a1b", "bob-key-SECRET-9f8e"
API_KEYS = f"alice:{ALICE},bob:{BOB}"
STREAM_ID = re.compile(r"[A-Za-z0-9_-]{22,}")


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_stream_ids_carry_at_least_128_random_bits_and_never_repeat() -> None:
    with serve_probed({}) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        ids = []
        for i in range(200):
            response = client.get("/chat/stream", params={"prompt": f"hi {i}"})
            stream_id = response.headers["x-stream-id"]
            assert STREAM_ID.fullmatch(stream_id), stream_id
            assert all(line == f"id: {stream_id}.{n}" for n, line in enumerate(re.findall(r"id: \S+", response.text)))  # .0: the opening
            ids.append(stream_id)
        client.close()
        gw.nothing_left()
    assert len(set(ids)) == len(ids)
    raw = [base64.urlsafe_b64decode(i + "=" * (-len(i) % 4)) for i in ids]
    assert min(len(r) for r in raw) >= 16  # 128 bits
    # Every one of the 128 bit positions varies across streams, and about half are ones.
    bits = [int.from_bytes(r[:16], "big") for r in raw]
    assert all(0 < sum(b >> k & 1 for b in bits) < len(bits) for k in range(128))
    ones = sum(bin(b).count("1") for b in bits) / (128 * len(bits))
    assert 0.45 < ones < 0.55


def test_another_key_can_neither_resume_nor_cancel_a_stream() -> None:
    env = {"API_KEYS": API_KEYS, "ECHO_DELAY_SECONDS": "0.05", "RESUME_GRACE_SECONDS": "5"}
    prompt = " ".join(f"w{i}" for i in range(200))
    with serve_probed(env) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        with client.stream("GET", "/chat/stream", params={"prompt": prompt}, headers=bearer(ALICE)) as alice:
            stream_id = alice.headers["x-stream-id"]
            lines = alice.iter_lines()
            first_id = next(line[4:] for line in lines if line.startswith("id: ") and not line.endswith(".0"))  # after the opening
            assert first_id == f"{stream_id}.1"

            assert client.get("/chat/stream", headers={**bearer(BOB), "last-event-id": first_id}).status_code == 204
            assert client.delete(f"/chat/stream/{stream_id}", headers=bearer(BOB)).status_code == 404
            assert client.delete(f"/chat/stream/{stream_id}").status_code == 401
            assert client.delete(f"/chat/stream/{stream_id}", headers=bearer(ALICE + "x")).status_code == 401
            assert client.get("/chat/stream", headers={"last-event-id": first_id}).status_code == 401
            assert client.get("/chat/stream", headers={**bearer(BOB), "last-event-id": f"{stream_id[:-1]}A.1"}).status_code == 204
            assert gw.gateway.metrics.active == 1  # Bob's attempts changed nothing

            with client.stream("GET", "/chat/stream", headers={**bearer(ALICE), "last-event-id": first_id}) as resumed:
                assert resumed.status_code == 200
                assert any(line == f"id: {stream_id}.2" for line in resumed.iter_lines())  # replays what followed
            assert client.delete(f"/chat/stream/{stream_id}", headers=bearer(ALICE)).status_code == 204
            rest = "\n".join(lines)
        assert rest.rstrip().endswith("data: cancelled")
        client.close()
        gw.nothing_left()


@contextmanager
def louden(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Everything at DEBUG, uvicorn's access log included (it logs paths with
    their query). After uvicorn started: its config sets its loggers' levels,
    and its own handlers, which do not propagate to caplog's."""
    caplog.set_level(logging.DEBUG)
    for name in ("asgi_stream", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    isolated = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error") if not logging.getLogger(name).propagate]
    for logger in isolated:
        logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        for logger in isolated:
            logger.removeHandler(caplog.handler)


def test_no_key_appears_in_any_response_or_log_line(caplog: pytest.LogCaptureFixture) -> None:
    echoing = Reply(401, "application/json", [json.dumps({"error": {"message": f"bad key {PROVIDER_KEY}"}}).encode()])
    with FakeUpstream(lambda seen: echoing) as upstream:
        env = {"API_KEYS": API_KEYS, "OPENAI_API_KEY": PROVIDER_KEY, "OPENAI_BASE_URL": upstream.url + "/v1"}
        env["DEFAULT_BACKEND"] = "echo"
        with serve_probed(env, access_log=True) as gw, louden(caplog):
            url = gw.url + "/chat/stream"
            answers = [
                stream("GET", url, params={"prompt": "hi", "access_token": ALICE}),  # EventSource's way
                stream("GET", url + f"?prompt=hi&access_token=&access%5Ftoken={ALICE}&x=%FF"),  # an encoded name, a blank decoy
                stream("GET", url, params={"prompt": "hi", "backend": "openai", "access_token": BOB}),
                stream("POST", url, json={"messages": [{"role": "user", "content": "hi"}]}, headers=bearer(ALICE)),
                stream("GET", url, params={"prompt": "hi", "access_token": ALICE + "-wrong"}),
                stream("GET", url, params={"prompt": "hi"}, headers=bearer(BOB[:-1])),
                stream("GET", gw.url + "/metrics", params={"access_token": BOB}),
                stream("DELETE", url + "/nope", params={"access_token": ALICE}),
                stream("GET", url, params={"prompt": "hi", "access_token": ALICE}, headers={"last-event-id": "x.1"}),
            ]
            gw.nothing_left()
        assert [a.status for a in answers] == [200, 200, 200, 200, 401, 401, 200, 404, 204]
        assert json.loads(answers[2].of("error")[0])["message"] == "bad key [redacted]"
    for answer in answers:
        text = json.dumps(answer.events) + answer.body.decode("utf-8", "replace") + json.dumps(dict(answer.headers))
        assert_no_secret(text, PROVIDER_KEY, ALICE, BOB)
    # What the server side logged (the test's own httpx client logs its URLs, with their keys, in this thread).
    server_log = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records if r.thread != threading.get_ident())
    assert "uvicorn.access" in server_log and "stream_end" in server_log  # both logs really were captured
    assert_no_secret(server_log, PROVIDER_KEY, ALICE, BOB)
