"""The vendors' Node SDKs as clients of the two front doors, through a real
server against echo: the `openai` npm package on POST /v1/responses
(`responses.create`, streaming and not, and `responses.stream(...)` with
`finalResponse()`) and `@anthropic-ai/sdk` on POST /v1/messages
(`messages.create` and `messages.stream(...)` with `finalMessage()`), with
tools and reasoning / thinking. Each script (tests/node/openai_responses.mjs,
tests/node/anthropic_messages.mjs) runs once per module and prints every
event and object the SDK gave it; here the events are folded again,
independently of the SDK, and the final object must be what they said. A
second turn carries the tool's result back (by previous_response_id; as a
tool_result block) and is answered with its text; errors are the SDKs' own
classes."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import run_agent_script, serve

PROMPT = "weather in Paris"
ECHO_REASONING = "The user said 3 words; I answer in kind."
ANSWER = f"looked up: {PROMPT}"  # the scripts' tool result, which echo answers with


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve({"API_KEYS": "alice:k1"}) as served:
        yield served.url


def run(script: str, base_url: str) -> dict[str, Any]:
    return run_agent_script(script, base_url, PROMPT)


@pytest.fixture(scope="module")
def responses(url: str) -> dict[str, Any]:
    return run("openai_responses.mjs", url + "/v1")


@pytest.fixture(scope="module")
def messages(url: str) -> dict[str, Any]:
    return run("anthropic_messages.mjs", url)


# --- openai-node on /v1/responses ----------------------------------------------------


def without_parsed(value: Any) -> Any:
    """A response as the wire had it: without the fields the SDK's helpers add (parsed_arguments, parsed, output_parsed)."""
    if isinstance(value, dict):
        return {k: without_parsed(v) for k, v in value.items() if k not in ("parsed_arguments", "parsed", "output_parsed")}
    return [without_parsed(v) for v in value] if isinstance(value, list) else value


def fold_response_events(events: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The completed response the events carry, after checking that every delta
    adds up to its `...done` event and to the item in `response.completed`;
    and the text of the output_text deltas."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    added = {e["output_index"]: e["item"] for e in events if e["type"] == "response.output_item.added"}
    done = {e["output_index"]: e["item"] for e in events if e["type"] == "response.output_item.done"}
    assert sorted(added) == sorted(done) == list(range(len(added))) and all(item["status"] == "in_progress" for item in added.values())
    deltas: dict[tuple[str, int], str] = defaultdict(str)
    finished: dict[tuple[str, int], str] = {}
    for e in events:
        for kind, field in (("output_text", "text"), ("reasoning_summary_text", "text"), ("function_call_arguments", "arguments")):
            if e["type"] == f"response.{kind}.delta":
                assert e["item_id"] == added[e["output_index"]]["id"]
                deltas[kind, e["output_index"]] += e["delta"]
            elif e["type"] == f"response.{kind}.done":
                finished[kind, e["output_index"]] = e[field]
    assert finished == dict(deltas)  # each ...done says what its deltas said
    completed = events[-1]["response"]
    assert completed["status"] == "completed" and completed["output"] == [done[i] for i in range(len(done))]
    for index, item in enumerate(completed["output"]):
        assert item["id"] == added[index]["id"] and item["type"] == added[index]["type"] and item["status"] == "completed"
        said = {"message": lambda: item["content"][0]["text"], "reasoning": lambda: item["summary"][0]["text"],
                "function_call": lambda: item["arguments"]}[item["type"]]()  # fmt: skip
        kind = {"message": "output_text", "reasoning": "reasoning_summary_text", "function_call": "function_call_arguments"}[item["type"]]
        assert said == deltas[kind, index]
    return completed, "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def first_turn_checks(response: dict[str, Any]) -> None:
    """Reasoning, then a function call with its arguments, and usage with the reasoning tokens."""
    reasoning, call = response["output"]
    assert reasoning["type"] == "reasoning" and [s["text"] for s in reasoning["summary"]] == [ECHO_REASONING]
    assert (call["type"], call["name"], call["call_id"], json.loads(call["arguments"])) == ("function_call", "lookup", "call_echo0",
                                                                                         {"text": PROMPT})  # fmt: skip
    assert (response["status"], response["output_text"], response["reasoning"]["effort"]) == ("completed", "", "low")
    usage = response["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"], usage["output_tokens_details"]["reasoning_tokens"]) == (
        3, 11, 14, 9)  # fmt: skip


def anonymous(response: dict[str, Any]) -> dict[str, Any]:
    """A response without what differs from one request to the next (its ids and time)."""
    response = without_parsed(response)
    output = [{k: v for k, v in item.items() if k != "id"} for item in response["output"]]
    return {**{k: v for k, v in response.items() if k not in ("id", "created_at")}, "output": output}


def test_openai_node_create_answers_with_reasoning_a_function_call_and_usage(responses: dict[str, Any]) -> None:
    created = responses["created"]
    first_turn_checks(created)
    assert created["id"].startswith("resp_") and [item["id"][:3] for item in created["output"]] == ["rs_", "fc_"]
    assert created["model"] == "echo/echo" and created["store"] is True and created["previous_response_id"] is None


def test_openai_node_create_with_stream_true_completes_with_what_its_events_said(responses: dict[str, Any]) -> None:
    completed, text = fold_response_events(responses["streamed"])
    first_turn_checks({**completed, "output_text": text})
    assert anonymous(completed) == anonymous(responses["created"])  # the same answer as not streaming


def test_openai_node_stream_helper_final_response_equals_the_events(responses: dict[str, Any]) -> None:
    helper = responses["helper"]
    completed, text = fold_response_events(helper["events"])
    final = helper["final"]
    assert without_parsed({**final, "output_text": None}) == without_parsed({**completed, "output_text": None})
    assert final["output_text"] == text == ""
    first_turn_checks(final)
    assert [item.get("parsed_arguments", "absent") for item in final["output"]] == ["absent", None]  # no strict tool to parse for


def test_openai_node_second_turn_by_previous_response_id_answers_with_the_tool_result(responses: dict[str, Any]) -> None:
    second = responses["second"]
    previous = responses["helper"]["final"]["id"]
    assert (second["status"], second["output_text"], second["previous_response_id"]) == ("completed", ANSWER, previous)
    (message,) = second["output"]
    assert (message["type"], message["role"], [part["type"] for part in message["content"]]) == ("message", "assistant", ["output_text"])
    streamed = responses["secondHelper"]
    completed, text = fold_response_events(streamed["events"])
    final = streamed["final"]
    assert final["output_text"] == text == ANSWER and without_parsed(final["output"]) == completed["output"]
    assert final["previous_response_id"] == responses["created"]["id"] and final["usage"] == completed["usage"] == second["usage"]
    assert second["usage"]["input_tokens"] > responses["created"]["usage"]["input_tokens"]  # the first turn is in the context


def test_openai_node_an_unknown_backend_is_the_sdks_not_found_error(responses: dict[str, Any]) -> None:
    error = responses["error"]
    assert (error["notFound"], error["apiError"], error["status"]) == (True, True, 404)
    assert (error["error"]["type"], error["error"]["param"], error["error"]["code"]) == ("not_found_error", "model", "model_not_found")


# --- @anthropic-ai/sdk on /v1/messages ------------------------------------------------


def fold_message_events(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The message Anthropic's event stream describes, folded here as its
    documentation says (not by the SDK): content blocks by index, their deltas,
    tool input as the JSON its input_json_deltas spell, message_delta's stop and usage."""
    kinds = [e["type"] for e in events if e["type"] != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    message = json.loads(json.dumps(events[0]["message"]))
    assert message["content"] == [] and message["stop_reason"] is None
    partial: dict[int, str] = {}
    open_blocks: set[int] = set()
    for e in events[1:]:
        if e["type"] == "content_block_start":
            assert e["index"] == len(message["content"]) and not open_blocks  # one block at a time, in order
            message["content"].append(e["content_block"])
            open_blocks.add(e["index"])
        elif e["type"] == "content_block_delta":
            assert e["index"] in open_blocks
            block, delta = message["content"][e["index"]], e["delta"]
            field = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "signature"}.get(delta["type"])
            if field:
                block[field] += delta[field]
            else:
                assert delta["type"] == "input_json_delta" and block["type"] == "tool_use"
                partial[e["index"]] = partial.get(e["index"], "") + delta["partial_json"]
        elif e["type"] == "content_block_stop":
            open_blocks.remove(e["index"])
            if e["index"] in partial:
                message["content"][e["index"]]["input"] = json.loads(partial[e["index"]])
        elif e["type"] == "message_delta":
            message.update(e["delta"])
            message["usage"].update({k: v for k, v in e["usage"].items() if v is not None})
    assert not open_blocks
    return dict(message)


def without_id(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k not in ("id", "parsed_output")}


def test_anthropic_node_create_has_thinking_and_tool_use_with_parsed_input(messages: dict[str, Any]) -> None:
    created = messages["created"]
    thinking, call = created["content"]
    assert (thinking["type"], thinking["thinking"], thinking["signature"]) == ("thinking", ECHO_REASONING, "")  # echo signs nothing
    assert (call["type"], call["id"], call["name"], call["input"]) == ("tool_use", "call_echo0", "lookup", {"text": PROMPT})
    assert (created["stop_reason"], created["usage"]) == ("tool_use", {"input_tokens": 3, "output_tokens": 11})
    assert (created["model"], created["role"]) == ("echo/echo", "assistant")
    assert created["id"].startswith("msg_") and created["type"] == "message"


def test_anthropic_node_stream_final_message_equals_the_events(messages: dict[str, Any]) -> None:
    helper = messages["helper"]
    folded = fold_message_events(helper["events"])
    final = helper["final"]
    assert without_id(final) == without_id(folded) and final["id"] == folded["id"]
    assert without_id(final) == without_id(messages["created"])  # the same answer as not streaming
    deltas = [e["delta"]["type"] for e in helper["events"] if e["type"] == "content_block_delta"]
    assert {"thinking_delta", "input_json_delta"} <= set(deltas)
    # The helper's own `thinking` and `inputJson` events said the same.
    assert (helper["seen"]["thinking"], json.loads(helper["seen"]["inputJson"])) == (ECHO_REASONING, {"text": PROMPT})


def test_anthropic_node_two_turn_tool_loop_answers_with_the_tool_result(messages: dict[str, Any]) -> None:
    second = messages["second"]  # thinking asked again: echo thinks, then answers with the tool result's text
    assert [block["type"] for block in second["content"]] == ["thinking", "text"] and second["content"][1]["text"] == ANSWER
    assert second["stop_reason"] == "end_turn" and second["usage"]["input_tokens"] > messages["created"]["usage"]["input_tokens"]
    streamed = messages["secondHelper"]
    final = streamed["final"]
    assert without_id(final) == without_id(fold_message_events(streamed["events"]))
    assert (final["content"], final["stop_reason"]) == ([{"type": "text", "text": ANSWER}], "end_turn")


def test_anthropic_node_errors_are_the_sdks_own_classes(messages: dict[str, Any]) -> None:
    errors = messages["errors"]
    for name in ("unknownBackend", "unknownBackendStreamed"):  # before the stream starts: a 404, streaming or not
        error = errors[name]
        assert (error["classes"], error["status"], error["error"]["type"]) == (["NotFoundError", "APIError"], 404, "error")
        assert error["error"]["error"]["type"] == "not_found_error" and "nowhere" in error["error"]["error"]["message"]
    assert (errors["wrongKey"]["classes"], errors["wrongKey"]["status"]) == (["AuthenticationError", "APIError"], 401)
    assert errors["wrongKey"]["error"]["error"]["type"] == "authentication_error"
    assert (errors["badThinking"]["classes"], errors["badThinking"]["status"]) == (["BadRequestError", "APIError"], 400)
    assert errors["badThinking"]["error"]["error"]["type"] == "invalid_request_error"
