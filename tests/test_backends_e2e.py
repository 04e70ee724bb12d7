"""The anthropic, ollama and gemini backends end to end: a real uvicorn serving
the gateway, a fake upstream on 127.0.0.1 replaying the shared fixtures cut
in every way (1-byte pieces, the server's own pieces, random cuts), the
requests each backend sends, and each backend's failure paths."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rig import Rig, assert_expected, cut, fixture_names, fixture_reply, load_fixture, natural_pieces, rig_fixture  # noqa: F401
from tests.upstream import Reply

FIXTURES = fixture_names("anthropic") + fixture_names("ollama") + fixture_names("gemini") + fixture_names("openai")
NEW_FIXTURES = [n for n in FIXTURES if not n.startswith("openai/")]


def backend_of(name: str) -> str:
    return name.split("/")[0]


def replay(rig: Rig, name: str, pieces: list[bytes]) -> None:
    expected, _ = load_fixture(name)
    rig.reset(fixture_reply(name, pieces))
    assert_expected(rig.chat(backend_of(name)), expected)
    retried = expected["http_status"] in (429, 500, 502, 503, 504, 529)
    assert len(rig.seen) == (3 if retried else 1)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_in_one_byte_pieces_streams_its_expected_output(rig: Rig, name: str) -> None:
    _, body = load_fixture(name)
    replay(rig, name, [body[i : i + 1] for i in range(len(body))])


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_in_its_servers_own_pieces_streams_its_expected_output(rig: Rig, name: str) -> None:
    _, body = load_fixture(name)
    replay(rig, name, natural_pieces(body))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_in_seeded_random_pieces_streams_its_expected_output(rig: Rig, name: str, seed: int) -> None:
    _, body = load_fixture(name)
    rng = random.Random(f"{name}/{seed}")
    replay(rig, name, cut(body, [rng.randrange(len(body)) for _ in range(rng.randint(1, 40))]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(NEW_FIXTURES), data=st.data())
def test_fixture_cut_anywhere_streams_its_expected_output(rig: Rig, name: str, data: st.DataObject) -> None:
    _, body = load_fixture(name)
    cuts = data.draw(st.lists(st.integers(1, len(body) - 1), max_size=30), label="cuts")
    replay(rig, name, cut(body, cuts))


# --- the requests sent upstream -------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Dis bonjour"},
    {"role": "assistant", "content": "Bonjour !"},
    {"role": "system", "content": "Answer in French."},
    {"role": "user", "content": "Encore"},
    {"role": "user", "content": "Et encore"},
]


def sent(rig: Rig, backend: str, **fields: object) -> tuple[dict[str, str], str, dict[str, object]]:
    """What the upstream received for CONVERSATION (the reply is a normal fixture)."""
    name = {"anthropic": "anthropic/normal", "ollama": "ollama/normal", "gemini": "gemini/normal"}[backend]
    _, body = load_fixture(name)
    rig.reset(fixture_reply(name, [body]))
    result = rig.chat(backend, CONVERSATION, **fields)
    assert result.of("done") == ["stop"]
    (seen,) = rig.seen
    assert seen.method == "POST"
    return seen.headers, seen.path, seen.json


def test_anthropic_request_has_key_version_top_level_system_and_alternating_turns(rig: Rig) -> None:
    headers, path, body = sent(rig, "anthropic", model="claude-x", max_tokens=77, temperature=0.3)
    assert path == "/v1/messages"
    assert headers["x-api-key"] == "sk-ant-test-SECRET" and headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers
    assert body == {
        "model": "claude-x", "max_tokens": 77, "stream": True, "temperature": 0.3,
        "system": "Be brief.\n\nAnswer in French.",
        "messages": [
            {"role": "user", "content": "Dis bonjour"},
            {"role": "assistant", "content": "Bonjour !"},
            {"role": "user", "content": "Encore\n\nEt encore"},
        ],
    }  # fmt: skip


def test_anthropic_request_always_sets_max_tokens_and_omits_what_is_not_given(rig: Rig) -> None:
    _, _, body = sent(rig, "anthropic")
    assert body["max_tokens"] == 1024  # the gateway's MAX_TOKENS default: Anthropic has none
    assert "temperature" not in body and body["model"] == "claude-sonnet-4-20250514"


def test_ollama_request_is_api_chat_with_the_whole_conversation_and_options(rig: Rig) -> None:
    headers, path, body = sent(rig, "ollama", model="llama3.2:latest", max_tokens=50, temperature=0.7)
    assert path == "/api/chat" and "authorization" not in headers
    assert body == {
        "model": "llama3.2:latest",
        "messages": CONVERSATION,
        "stream": True,
        "options": {"num_predict": 50, "temperature": 0.7},
    }


def test_gemini_request_has_key_header_only_contents_system_instruction_and_config(rig: Rig) -> None:
    headers, path, body = sent(rig, "gemini", model="gemini-2.5-flash", max_tokens=256, temperature=0)
    assert path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert headers["x-goog-api-key"] == "AIza-test-SECRET" and "SECRET" not in path
    assert body == {
        "systemInstruction": {"parts": [{"text": "Be brief.\n\nAnswer in French."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Dis bonjour"}]},
            {"role": "model", "parts": [{"text": "Bonjour !"}]},
            {"role": "user", "parts": [{"text": "Encore\n\nEt encore"}]},
        ],
        "generationConfig": {"maxOutputTokens": 256, "temperature": 0.0},
    }


@pytest.mark.parametrize("backend", ["openai", "anthropic", "ollama", "gemini"])
def test_upstream_requests_name_the_gateway_and_carry_no_cookie_nor_a_wish_for_compression(rig: Rig, backend: str) -> None:
    """The shared client's cookie jar would carry a cookie one user's request got into every
    other user's request; a compressing proxy would hold tokens back until its buffer fills."""
    name = "openai/normal_with_usage" if backend == "openai" else f"{backend}/normal"
    _, body = load_fixture(name)
    with_cookie = fixture_reply(name, [body])
    with_cookie.headers["set-cookie"] = "__cf_bm=one-users-cookie; Path=/; HttpOnly"
    rig.reset(with_cookie, fixture_reply(name, [body]))
    for _ in range(2):
        assert rig.chat(backend).of("done") == ["stop"]
    assert len(rig.seen) == 2
    for seen in rig.seen:
        assert seen.headers["user-agent"] == "asgi-stream"
        assert "cookie" not in seen.headers and "accept-encoding" not in seen.headers


def test_gemini_request_without_system_messages_has_no_system_instruction(rig: Rig) -> None:
    _, body = load_fixture("gemini/normal")
    rig.reset(fixture_reply("gemini/normal", [body]))
    rig.chat("gemini", [{"role": "user", "content": "x"}])
    assert "systemInstruction" not in rig.seen[0].json and rig.seen[0].path.startswith("/v1beta/models/gemini-2.0-flash:")


@pytest.mark.parametrize(
    "model",
    [
        "..",
        ".",
        "a/../b",
        "models/gemini",
        "a?alt=json",
        "a#x",
        "gemini:generateContent",
        "a b",
        "a%2Fb",
        "-x",
        "_x",
        "a\nb",
        "é",
        "x" * 257,
        " ",
        "a ",
    ],
)
def test_gemini_model_that_is_not_a_plain_id_is_refused_before_any_upstream_request(rig: Rig, model: str) -> None:
    rig.reset(Reply(500))
    result = rig.chat("gemini", model=model)
    assert result.status == 400 and json.loads(result.body)["error"]["type"] == "invalid_request"
    assert rig.seen == []


@pytest.mark.parametrize("model", ["gemini-2.0-flash", "gemini-1.5-pro-002", "x" * 256, "a..b", "tunedModels.x_1"])
def test_gemini_plain_model_ids_are_accepted(rig: Rig, model: str) -> None:
    _, body = load_fixture("gemini/normal")
    rig.reset(fixture_reply("gemini/normal", [body]))
    assert rig.chat("gemini", model=model).of("done") == ["stop"]
    assert rig.seen[0].path == f"/v1beta/models/{model}:streamGenerateContent?alt=sse"


# --- failure paths -----------------------------------------------------------------


def sse(*events: tuple[str | None, object]) -> bytes:
    return b"".join(
        (f"event: {name}\n" if name else "").encode() + b"data: " + json.dumps(data).encode() + b"\n\n" for name, data in events
    )


def ndjson(*lines: object) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def error_of(result) -> dict[str, object]:  # type: ignore[no-untyped-def]
    assert result.names[-2:] == ["error", "done"] and result.of("done") == ["error"]
    return json.loads(result.of("error")[0])


ANTHROPIC_START = ("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}})


def text(t: str) -> tuple[str, object]:
    return ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})


def test_anthropic_stream_cut_before_message_stop_is_a_protocol_error_with_the_usage_known(rig: Rig) -> None:
    body = sse(
        ANTHROPIC_START, text("Hi"), ("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}})
    )
    rig.reset(Reply(pieces=[body]))
    result = rig.chat("anthropic")
    assert result.of("token") == ["Hi"]
    assert error_of(result)["type"] == "protocol_error" and "message_stop" in error_of(result)["message"]
    usage = json.loads(result.of("usage")[0])
    assert usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_anthropic_message_stop_without_a_stop_reason_is_a_protocol_error(rig: Rig) -> None:
    rig.reset(Reply(pieces=[sse(ANTHROPIC_START, text("Hi"), ("message_stop", {"type": "message_stop"}))]))
    assert error_of(rig.chat("anthropic"))["type"] == "protocol_error"


def test_anthropic_event_that_is_not_json_is_a_protocol_error(rig: Rig) -> None:
    rig.reset(Reply(pieces=[b"event: content_block_delta\ndata: {oops\n\n"]))
    assert error_of(rig.chat("anthropic"))["type"] == "protocol_error"


@pytest.mark.parametrize(
    ("stop_reason", "done"),
    [
        ("stop_sequence", "stop"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("model_context_window_exceeded", "length"),
    ],
)
def test_anthropic_stop_reasons_are_normalized(rig: Rig, stop_reason: str, done: str) -> None:
    body = sse(
        ANTHROPIC_START,
        text("Hi"),
        ("message_delta", {"delta": {"stop_reason": stop_reason}, "usage": {"output_tokens": 2}}),
        ("message_stop", {"type": "message_stop"}),
    )
    rig.reset(Reply(pieces=[body]))
    assert rig.chat("anthropic").of("done") == [done]


def test_anthropic_unknown_stop_reason_is_stop_with_the_raw_value_in_usage(rig: Rig) -> None:
    body = sse(
        ANTHROPIC_START,
        ("message_delta", {"delta": {"stop_reason": "new_reason"}, "usage": {"output_tokens": 2}}),
        ("message_stop", {"type": "message_stop"}),
    )
    rig.reset(Reply(pieces=[body]))
    result = rig.chat("anthropic")
    assert result.of("done") == ["stop"]
    assert json.loads(result.of("usage")[0])["upstream_finish_reason"] == "new_reason"


def test_anthropic_cache_tokens_count_as_prompt_and_message_delta_counts_win(rig: Rig) -> None:
    start = (
        "message_start",
        {
            "message": {
                "usage": {
                    "input_tokens": 5,
                    "cache_creation_input_tokens": 100,
                    "cache_read_input_tokens": 20,
                    "output_tokens": 1,
                }
            }
        },
    )
    delta = (
        "message_delta",
        {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9, "input_tokens": 6, "cache_read_input_tokens": 30}},
    )
    rig.reset(Reply(pieces=[sse(start, text("ok"), delta, ("message_stop", {}))]))
    assert json.loads(rig.chat("anthropic").of("usage")[0]) == {"prompt_tokens": 36, "completion_tokens": 9, "total_tokens": 45}


def test_anthropic_thinking_tool_input_citations_and_unknown_events_never_become_tokens(rig: Rig) -> None:
    deltas = [
        {"type": "thinking_delta", "thinking": "hmm"},
        {"type": "signature_delta", "signature": "c2ln"},
        {"type": "input_json_delta", "partial_json": '{"a":'},
        {"type": "citations_delta", "citation": {}},
        {"type": "text_delta", "text": ""},
    ]
    body = sse(
        ANTHROPIC_START,
        *[("content_block_delta", {"index": 0, "delta": d}) for d in deltas],
        ("ping", {"type": "ping"}),
        ("brand_new_event", {"text": "no"}),
        text("yes"),
        ("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
        ("message_stop", {}),
    )
    rig.reset(Reply(pieces=[body]))
    assert rig.chat("anthropic").of("token") == ["yes"]


def test_anthropic_http_error_body_reaches_the_client_with_status_and_type(rig: Rig) -> None:
    body = b'{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"},"request_id":"req_1"}'
    rig.reset(Reply(401, "application/json", [body]))
    error = error_of(rig.chat("anthropic"))
    assert error == {
        "type": "upstream_error",
        "message": "invalid x-api-key",
        "status": 401,
        "upstream_type": "authentication_error",
    }
    assert len(rig.seen) == 1


def test_ollama_stream_without_its_done_line_is_a_protocol_error(rig: Rig) -> None:
    rig.reset(Reply(200, "application/x-ndjson", [ndjson({"message": {"role": "assistant", "content": "Hi"}, "done": False})]))
    result = rig.chat("ollama")
    assert result.of("token") == ["Hi"] and error_of(result)["type"] == "protocol_error"


def test_ollama_line_that_is_not_json_is_a_protocol_error(rig: Rig) -> None:
    rig.reset(Reply(200, "application/x-ndjson", [b"<html>\n"]))
    assert error_of(rig.chat("ollama"))["type"] == "protocol_error"


def counted(prompt: int, completion: int, **extra: object) -> dict[str, object]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, **extra}


@pytest.mark.parametrize(("done_line", "done", "usage"), [
    ({"done_reason": "length", "prompt_eval_count": 3, "eval_count": 4}, "length", counted(3, 4)),
    ({"eval_count": 4}, "stop", counted(0, 4)),  # omitempty: 0 prompt tokens are left out
    ({"done_reason": "unload"}, "stop", counted(0, 0, upstream_finish_reason="unload")),
])  # fmt: skip
def test_ollama_done_line_gives_finish_reason_and_usage(
    rig: Rig, done_line: dict[str, object], done: str, usage: dict[str, object]
) -> None:
    lines = ndjson(
        {"message": {"role": "assistant", "content": "Hi", "thinking": "think"}, "done": False},
        {"message": {"role": "assistant", "content": " there"}, "done": True, **done_line},
        {"message": {"content": "after done: ignored"}, "done": False},
    )
    rig.reset(Reply(200, "application/x-ndjson", [lines]))
    result = rig.chat("ollama")
    assert result.of("token") == ["Hi", " there"]  # text on the done line is text; thinking is not
    assert result.of("done") == [done] and json.loads(result.of("usage")[0]) == usage


def test_ollama_unreachable_is_upstream_unavailable(rig: Rig) -> None:
    from tests.conftest import free_port, serve, stream

    with serve({"OLLAMA_BASE_URL": f"http://127.0.0.1:{free_port()}"}) as gw:
        result = stream("GET", gw.url + "/chat/stream?prompt=hi&backend=ollama")
    assert error_of(result)["type"] == "upstream_unavailable"


GEMINI_OK = {
    "candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}}],
    "usageMetadata": {"promptTokenCount": 4, "totalTokenCount": 4},
}


def gemini_stream(*chunks: object) -> Reply:
    return Reply(pieces=[b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks)])


def test_gemini_blocked_prompt_is_content_filter(rig: Rig) -> None:
    blocked = {
        "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
        "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7},
    }
    rig.reset(gemini_stream(blocked))
    result = rig.chat("gemini")
    assert result.names == ["usage", "done"] and result.of("done") == ["content_filter"]
    assert json.loads(result.of("usage")[0]) == {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}


def test_gemini_stream_without_a_finish_reason_is_a_protocol_error_with_the_usage_known(rig: Rig) -> None:
    rig.reset(gemini_stream(GEMINI_OK))
    result = rig.chat("gemini")
    assert result.of("token") == ["Hi"] and error_of(result)["type"] == "protocol_error"
    assert json.loads(result.of("usage")[0]) == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}


def test_gemini_raw_json_error_after_chunks_ends_the_stream_with_its_message(rig: Rig) -> None:
    # python-genai reads non-`data:` lines until the braces balance: errors arrive that way mid-stream
    error = (
        b'{\n  "error": {\n    "code": 499,\n    "message": "The operation was cancelled.",\n    "status": "CANCELLED"\n  }\n}\n'
    )
    rig.reset(Reply(pieces=[gemini_stream(GEMINI_OK).pieces[0], error]))
    result = rig.chat("gemini")
    assert result.of("token") == ["Hi"]
    assert error_of(result) == {
        "type": "upstream_error",
        "message": "The operation was cancelled.",
        "upstream_type": "CANCELLED",
        "code": 499,
    }
    assert json.loads(result.of("usage")[0])["prompt_tokens"] == 4  # the usage known before the error rides along


def test_gemini_error_in_a_data_event_ends_the_stream_with_its_message(rig: Rig) -> None:
    rig.reset(gemini_stream(GEMINI_OK, {"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}}))
    assert error_of(rig.chat("gemini"))["message"] == "Internal error encountered."


def test_gemini_endless_text_outside_events_is_a_protocol_error(rig: Rig) -> None:
    rig.reset(Reply(pieces=[b"{\n" + b'"x": "' + b"y" * 70_000 + b'"\n']))
    assert "outside SSE" in error_of(rig.chat("gemini"))["message"]


def test_gemini_raw_json_that_is_a_chunk_is_read_as_one(rig: Rig) -> None:
    final = {"candidates": [{"content": {"parts": [{"text": " there"}]}, "finishReason": "STOP"}]}
    rig.reset(Reply(pieces=[gemini_stream(GEMINI_OK).pieces[0], json.dumps(final, indent=1).encode()]))
    assert rig.chat("gemini").of("token") == ["Hi", " there"]


@pytest.mark.parametrize(
    ("reason", "done"), [("MAX_TOKENS", "length"), ("RECITATION", "content_filter"), ("SPII", "content_filter"), ("STOP", "stop")]
)
def test_gemini_finish_reasons_are_normalized(rig: Rig, reason: str, done: str) -> None:
    rig.reset(gemini_stream(GEMINI_OK, {"candidates": [{"finishReason": reason}]}))
    assert rig.chat("gemini").of("done") == [done]


@pytest.mark.parametrize("reason", ["OTHER", "MALFORMED_FUNCTION_CALL", "FINISH_REASON_UNSPECIFIED"])
def test_gemini_failed_finish_reasons_are_errors(rig: Rig, reason: str) -> None:
    rig.reset(gemini_stream(GEMINI_OK, {"candidates": [{"finishReason": reason}]}))
    assert reason in error_of(rig.chat("gemini"))["message"]


def test_gemini_thought_parts_are_not_tokens_and_thought_tokens_count_as_completion(rig: Rig) -> None:
    chunk = {
        "candidates": [
            {"content": {"parts": [{"text": "thinking...", "thought": True}, {"text": "Answer"}]}, "finishReason": "STOP"}
        ],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "thoughtsTokenCount": 10, "totalTokenCount": 15},
    }
    rig.reset(gemini_stream(chunk))
    result = rig.chat("gemini")
    assert result.of("token") == ["Answer"]
    assert json.loads(result.of("usage")[0]) == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15, "reasoning_tokens": 10}
    assert result.of("reasoning") == ["thinking..."]  # reasoning now streams as its own event


def test_gemini_function_call_then_stop_is_tool_calls(rig: Rig) -> None:
    chunk = {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {}}}]}, "finishReason": "STOP"}]}
    rig.reset(gemini_stream(chunk))
    assert rig.chat("gemini").of("done") == ["tool_calls"]


def test_gemini_event_that_is_not_a_json_object_is_a_protocol_error(rig: Rig) -> None:
    rig.reset(Reply(pieces=[b"data: [1, 2]\r\n\r\n"]))
    assert error_of(rig.chat("gemini"))["type"] == "protocol_error"


def test_ollama_is_configured_by_its_url_alone_and_others_by_their_keys() -> None:
    from asgi_stream_core.config import load_config

    assert set(load_config({"OLLAMA_BASE_URL": "http://127.0.0.1:11434"}).upstreams) == {"echo", "ollama"}
    assert load_config({"OLLAMA_BASE_URL": "http://127.0.0.1:11434"}).default_backend == "ollama"
    config = load_config({"ANTHROPIC_API_KEY": "k", "GEMINI_API_KEY": "g"})
    assert set(config.upstreams) == {"echo", "anthropic", "gemini"} and config.default_backend == "anthropic"
    assert config.upstreams["anthropic"].base_url == "https://api.anthropic.com"
    assert config.upstreams["gemini"].base_url == "https://generativelanguage.googleapis.com"


def test_a_backend_that_is_not_configured_names_the_variable_to_set() -> None:
    from tests.conftest import serve, stream

    with serve({}) as gw:
        result = stream("GET", gw.url + "/chat/stream?prompt=hi&backend=ollama")
        keyed = stream("GET", gw.url + "/chat/stream?prompt=hi&backend=gemini")
    assert result.status == 400 and "OLLAMA_BASE_URL is not set" in json.loads(result.body)["error"]["message"]
    assert keyed.status == 400 and "GEMINI_API_KEY is not set" in json.loads(keyed.body)["error"]["message"]
