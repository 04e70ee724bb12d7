"""The `openai` backend against OpenAI-compatible servers (PROVIDERS.md 4):
hand-built transcripts in each server's own layout, served by the fake
upstream, with what the client must see. Where the openai SDK reads the same
bytes the same way, it is checked too (`agrees_with_sdk`)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.rig import Rig, rig_fixture  # noqa: F401
from tests.test_sdk_oracles import Outcome, openai_outcome, ours
from tests.upstream import Reply


def data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}  # fmt: skip


USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


def run(rig: Rig, body: bytes, agrees_with_sdk: bool = True) -> Outcome:
    rig.reset(Reply(pieces=[body[i : i + 7] for i in range(0, len(body), 7)]))
    mine = ours(rig.chat("openai"))
    if agrees_with_sdk:
        assert mine == openai_outcome(rig.upstream.url)
    return mine


def test_vllm_role_chunk_stop_reason_field_and_separate_usage_chunk(rig: Rig) -> None:
    body = b"".join([
        data(chunk({"role": "assistant", "content": ""})),
        data(chunk({"content": "Bonjour"})),
        data(chunk({"content": " à vous"})),
        data(chunk({}, "stop", stop_reason=None)),  # vLLM: the matched stop string or token id, or null
        data({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE, "system_fingerprint": None}),
        b"data: [DONE]\n\n",
    ])  # fmt: skip
    assert run(rig, body) == Outcome(["Bonjour", " à vous"], "stop", (11, 4, 15))


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_vllm_reasoning_deltas_never_reach_the_client(rig: Rig, field: str) -> None:
    # vLLM after PR #27752 says `reasoning`, before it `reasoning_content`: neither is answer text
    body = b"".join([
        data(chunk({"role": "assistant", "content": ""})),
        data(chunk({field: "Let me think", "content": None})),
        data(chunk({field: " about it."})),
        data(chunk({"content": "42"})),
        data(chunk({}, "stop")),
        b"data: [DONE]\n\n",
    ])  # fmt: skip
    assert run(rig, body) == Outcome(["42"], "stop", None)


def test_vllm_error_event_then_done_is_an_error_with_integer_code(rig: Rig) -> None:
    error = {"error": {"message": "The decoder prompt is too long", "type": "BadRequestError", "param": None, "code": 400}}
    body = data(chunk({"role": "assistant", "content": ""})) + data(chunk({"content": "Hi"})) + data(error) + b"data: [DONE]\n\n"
    rig.reset(Reply(pieces=[body]))
    result = rig.chat("openai")
    assert result.of("token") == ["Hi"] and result.of("done") == ["error"]
    event = json.loads(result.of("error")[0])
    assert event == {
        "type": "upstream_error",
        "message": "The decoder prompt is too long",
        "upstream_type": "BadRequestError",
        "code": 400,
    }
    assert run(rig, body) == Outcome(["Hi"], "error", None, "The decoder prompt is too long")


def test_old_vllm_top_level_object_error(rig: Rig) -> None:
    # older vLLM sent {"object": "error", ...}; the SDK only knows {"error": ...} and drops it as a chunk with no choices
    body = data({"object": "error", "message": "model overloaded", "type": "ServiceUnavailableError", "code": 503})
    assert run(rig, body + b"data: [DONE]\n\n", agrees_with_sdk=False) == Outcome([], "error", None, "model overloaded")


@pytest.mark.parametrize(("reason", "done"), [("abort", "error"), ("repetition", "stop")])
def test_vllm_extra_finish_reasons(rig: Rig, reason: str, done: str) -> None:
    body = data(chunk({"content": "Hi"})) + data(chunk({}, reason)) + b"data: [DONE]\n\n"
    # The SDK passes the raw value on and raises nothing: `abort` (vLLM gave up) is an error only in our reading
    outcome = run(rig, body, agrees_with_sdk=done != "error")
    assert (outcome.tokens, outcome.finish) == (["Hi"], done)


LLAMA_TIMINGS = {"prompt_n": 11, "prompt_ms": 12.5, "predicted_n": 4, "predicted_ms": 40.1}


def llama_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    # llama.cpp key order: choices, created, id, model, system_fingerprint, object
    return {"choices": [{"finish_reason": finish, "index": 0, "delta": delta}], "created": 1, "id": "chatcmpl-x",
            "model": "qwen", "system_fingerprint": "b6000-abcdef", "object": "chat.completion.chunk", **extra}  # fmt: skip


def test_llama_cpp_null_role_content_reasoning_timings_and_no_done_marker(rig: Rig) -> None:
    body = b"".join(
        [
            data(llama_chunk({"role": "assistant", "content": None})),
            data(llama_chunk({"reasoning_content": "Thinking..."})),
            data(llama_chunk({"content": "Salut"})),
            data(llama_chunk({"content": " !\n"})),
            data(llama_chunk({}, "stop", usage=USAGE, timings=LLAMA_TIMINGS)),
        ]
    )  # fmt: skip  (before PR #9459: the stream just ends)
    assert run(rig, body) == Outcome(["Salut", " !\n"], "stop", (11, 4, 15))


def test_llama_cpp_done_marker_without_its_blank_line(rig: Rig) -> None:
    # llama-server b10603 ends with `data: [DONE]` and no blank line; the usage chunk comes before it
    body = data(llama_chunk({"content": "Hi"})) + data(llama_chunk({}, "length")) + data({"choices": [], "usage": USAGE})
    assert run(rig, body + b"data: [DONE]\n") == Outcome(["Hi"], "length", (11, 4, 15))


def test_llama_cpp_empty_keep_alive_data_is_skipped(rig: Rig) -> None:
    body = data(llama_chunk({"content": "Hi"})) + b"data: \n\n" + data(llama_chunk({}, "stop")) + b"data: [DONE]\n\n"
    # the openai SDK json-decodes the empty data and raises JSONDecodeError: for us an empty frame is a keep-alive
    assert run(rig, body, agrees_with_sdk=False) == Outcome(["Hi"], "stop", None)


def test_lm_studio_role_on_every_delta_reasoning_content_and_inline_think_tags(rig: Rig) -> None:
    def lm(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return data(chunk({"role": "assistant", **delta}, finish, system_fingerprint="qwen3-8b"))

    body = b"".join([
        lm({"reasoning_content": "hmm"}),
        lm({"content": "<think>inline</think>"}),  # inline think tags are content: the model wrote them
        lm({"content": "Olá"}),
        lm({}, "stop"),
        b"data: [DONE]\n\n",
    ])  # fmt: skip
    assert run(rig, body) == Outcome(["<think>inline</think>", "Olá"], "stop", None)


def test_openrouter_comments_provider_fields_and_usage_on_the_final_chunk(rig: Rig) -> None:
    usage = {**USAGE, "cost": 0.00012, "is_byok": False}
    body = b"".join([
        b": OPENROUTER PROCESSING\n\n",
        data(chunk({"role": "assistant", "content": ""}, provider="OpenAI")),
        b": OPENROUTER PROCESSING\n\n",
        data(chunk({"content": "Hello"}, provider="OpenAI")),
        data(chunk({"content": "", "reasoning": "r", "reasoning_details": [{"type": "reasoning.text", "text": "r"}]})),
        data(chunk({}, "stop", provider="OpenAI", native_finish_reason="stop", usage=usage)),
        b"data: [DONE]\n\n",
    ])  # fmt: skip
    assert run(rig, body) == Outcome(["Hello"], "stop", (11, 4, 15))


def test_openrouter_in_stream_error_after_tokens(rig: Rig) -> None:
    error = {**chunk({"content": ""}, "error"), "error": {"code": 502, "message": "Provider returned error"}}
    body = data(chunk({"content": "Par"})) + data(error) + b"data: [DONE]\n\n"
    rig.reset(Reply(pieces=[body]))
    result = rig.chat("openai")
    assert result.of("token") == ["Par"] and result.of("done") == ["error"]
    assert json.loads(result.of("error")[0])["message"] == "Provider returned error"


def test_groq_x_groq_usage_with_its_duplicate_top_level_usage(rig: Rig) -> None:
    groq_usage = {"queue_time": 0.02, "prompt_tokens": 11, "prompt_time": 0.001, "completion_tokens": 4,
                  "completion_time": 0.01, "total_tokens": 15, "total_time": 0.011}  # fmt: skip
    body = b"".join([
        data(chunk({"role": "assistant", "content": ""}, x_groq={"id": "req_01", "seed": 42})),
        data(chunk({"reasoning": "thinking"})),
        data(chunk({"content": "Hola"})),
        data(chunk({}, "stop", x_groq={"id": "req_01", "usage": groq_usage}, usage=groq_usage)),
        b"data: [DONE]\n\n",
    ])  # fmt: skip
    assert run(rig, body) == Outcome(["Hola"], "stop", (11, 4, 15))


def test_groq_usage_only_under_x_groq_is_read(rig: Rig) -> None:
    # the SDK has no x_groq field, so it sees no usage here: only our reading finds it
    body = data(chunk({"content": "Hola"})) + data(chunk({}, "stop", x_groq={"id": "r", "usage": USAGE})) + b"data: [DONE]\n\n"
    assert run(rig, body, agrees_with_sdk=False) == Outcome(["Hola"], "stop", (11, 4, 15))


@pytest.mark.parametrize("x_groq", ["req_01", ["req_01"], 7, None])
def test_an_x_groq_that_is_not_an_object_is_ignored(rig: Rig, x_groq: Any) -> None:
    # an extension field of a shape no server sends: the chunk's text and usage still count
    body = b"".join([
        data(chunk({"content": "Hola"}, x_groq=x_groq)),
        data(chunk({}, "stop", x_groq=x_groq, usage={"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15})),
        b"data: [DONE]\n\n",
    ])  # fmt: skip
    assert run(rig, body) == Outcome(["Hola"], "stop", (11, 4, 15))


DEEP = "[" * 300 + "0" + "]" * 300  # JSON orjson reads (1,024 levels) but does not write (254)


@pytest.mark.parametrize("delta", [
    '{"reasoning_details": [{"type": "reasoning.text", "index": 0, "text": "Hm", "format": ' + DEEP + "}]}",
    '{"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}, '
    '"extra_content": {"google": {"thought_signature": ' + DEEP + "}}}]}",
], ids=["reasoning_details", "extra_content"])  # fmt: skip
def test_a_round_trip_value_nested_past_what_json_writes_ends_the_stream_cleanly(rig: Rig, delta: str) -> None:
    # kept for the turn's `message` event, written at the end of the stream: it must end with done, never cut off
    body = b'data: {"choices": [{"index": 0, "delta": ' + delta.encode() + b', "finish_reason": null}]}\n\n'
    body += data(chunk({}, "stop")) + b"data: [DONE]\n\n"
    rig.reset(Reply(pieces=[body]))
    result = rig.chat("openai")
    assert result.of("error") == []
    assert result.of("done") == ["stop"]
    message = json.loads(result.of("message")[0])  # the turn's message, without the value it could not write
    assert "format" not in json.dumps(message) and "extra_content" not in message.get("tool_calls", [{}])[0]


@pytest.mark.parametrize("reason", ["eos", "eos_token", "end"])
def test_together_tgi_and_gateway_end_of_sequence_reasons_are_stop(rig: Rig, reason: str) -> None:
    together = {"token": {"id": 2, "text": "", "logprob": 0, "special": True}, "generated_text": "Hi", "stats": {}}
    body = data(chunk({"content": "Hi"})) + data(chunk({}, reason, **together)) + b"data: [DONE]\n\n"
    assert run(rig, body).finish == "stop"


def test_unknown_finish_reason_is_stop_with_the_raw_value_in_usage(rig: Rig) -> None:
    rig.reset(Reply(pieces=[data(chunk({"content": "Hi"})) + data(chunk({}, "brand_new")) + b"data: [DONE]\n\n"]))
    result = rig.chat("openai")
    assert result.of("done") == ["stop"]
    assert json.loads(result.of("usage")[0])["upstream_finish_reason"] == "brand_new"


def test_stream_that_ends_with_no_finish_reason_and_no_error_is_a_protocol_error(rig: Rig) -> None:
    rig.reset(Reply(pieces=[data(chunk({"content": "Hi"}))]))
    result = rig.chat("openai")
    assert result.of("token") == ["Hi"] and json.loads(result.of("error")[0])["type"] == "protocol_error"
