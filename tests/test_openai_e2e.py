"""The openai backend end to end: a real uvicorn serving the gateway, a fake
OpenAI upstream on 127.0.0.1 replaying the shared fixtures in small pieces."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.conftest import serve, stream
from tests.upstream import FIXTURES, FakeUpstream, Reply, fixture_reply, sse_tokens

OPENAI_FIXTURES = sorted(p.name.removesuffix(".expected.json") for p in (FIXTURES / "openai").glob("*.expected.json"))
assert len(OPENAI_FIXTURES) == 7, OPENAI_FIXTURES  # a glob that found nothing would turn the cases into a silent skip


def openai_env(upstream: FakeUpstream, **extra: str) -> dict[str, str]:
    return {"OPENAI_API_KEY": "sk-test-SECRET", "OPENAI_BASE_URL": upstream.url + "/v1", **extra}


@pytest.mark.parametrize("piece_size", [1, 5, 4096])
@pytest.mark.parametrize("name", OPENAI_FIXTURES)
def test_openai_fixture_streams_its_expected_output(name: str, piece_size: int) -> None:
    expected = json.loads((FIXTURES / "openai" / f"{name}.expected.json").read_text())
    with FakeUpstream(lambda seen: fixture_reply(f"openai/{name}", piece_size)) as upstream, serve(openai_env(upstream)) as gw:
        result = stream("POST", gw.url + "/chat/stream", json={"messages": [{"role": "user", "content": "hi"}]})
    assert result.status == 200
    assert result.of("token") == expected["tokens"]
    assert result.names[-1] == "done" and result.names.count("done") == 1
    assert result.of("done") == [expected["finish_reason"]]
    if expected["usage"] is not None:
        usage = json.loads(result.of("usage")[0])
        assert {k: usage[k] for k in expected["usage"]} == expected["usage"]
        assert "estimated" not in usage
    if expected["error"] is not None:
        error = json.loads(result.of("error")[0])
        assert error["message"] == expected["error"]["message"]
        assert error.get("upstream_type") == expected["error"]["type"]
        # an HTTP error carries its status; an error inside a 200 stream has none
        assert error.get("status") == (expected["http_status"] if expected["http_status"] != 200 else None), error
        assert result.names[-2:] == ["error", "done"]


def test_the_request_sent_upstream_is_an_openai_streaming_request() -> None:
    with FakeUpstream() as upstream, serve(openai_env(upstream)) as gw:
        body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "backend": "openai", "model": "gpt-x", "max_tokens": 7, "temperature": 0.5}
        result = stream("POST", gw.url + "/chat/stream", json=body)
    assert result.text == "Hello world"
    (seen,) = upstream.seen
    assert seen.method == "POST" and seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-test-SECRET"
    sent = seen.json
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == body["messages"] and sent["model"] == "gpt-x"
    assert sent["max_tokens"] == 7 and sent["temperature"] == 0.5


def test_client_disconnect_closes_the_upstream_connection_at_once() -> None:
    slow = sse_tokens([f" t{i}" for i in range(500)], pause=0.05)
    with FakeUpstream(lambda seen: slow) as upstream, serve(openai_env(upstream)) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        body = json.dumps({"messages": [{"role": "user", "content": "go"}]}).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /chat/stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while received.count(b"event: token") < 3:
            received += sock.recv(65536)
        sock.close()
        closed_at = time.monotonic()
        assert upstream.wait_for(lambda: upstream.seen and upstream.seen[0].closed_by_client is not None, 30)
        assert upstream.seen[0].closed_by_client - closed_at < 3  # at once, not when the reply ends
        assert not upstream.seen[0].completed
        assert upstream.wait_for(lambda: gw.gateway.metrics.active == 0, 30)


def test_upstream_http_error_becomes_an_error_event_with_status() -> None:
    body = b'{"error": {"message": "Incorrect API key provided: sk-test-SECRET.", "type": "invalid_request_error"}}'
    reply = Reply(401, "application/json", [body])
    with FakeUpstream(lambda seen: reply) as upstream, serve(openai_env(upstream)) as gw:
        result = stream("GET", gw.url + "/chat/stream?prompt=hi&backend=openai")
    assert result.names == ["error", "done"]
    error = json.loads(result.of("error")[0])
    assert error["type"] == "upstream_error" and error["status"] == 401
    assert "sk-test-SECRET" not in error["message"] and "[redacted]" in error["message"]
    assert len(upstream.seen) == 1  # 401 is not retried
