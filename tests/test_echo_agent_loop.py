"""An agent loop against echo, with no provider key: the README's example.
The official SDKs (openai-python's stream helper, the openai npm package)
and plain HTTP on /chat/stream each run two turns through a real server:
tools and reasoning_effort -> reasoning and a tool call -> the message
appended with a tool result -> the answer. Resume replays the new events."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import run_agent_script, serve, stream

TOOLS: list[Any] = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
PROMPT = "weather in Paris"


@pytest.fixture(scope="module")
def url() -> Any:
    with serve({"API_KEYS": "alice:k1"}) as served:
        yield served.url


def test_openai_python_runs_a_two_turn_tool_loop_on_v1(url: str, request: pytest.FixtureRequest) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
    request.addfinalizer(client.close)  # its connections closed now, not when collected (a ResourceWarning then)
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    with client.chat.completions.stream(model="echo", messages=messages, tools=TOOLS, reasoning_effort="low",
                                        stream_options={"include_usage": True}) as events:  # fmt: skip
        kinds = {event.type for event in events}
        first = events.get_final_completion()
    message = first.choices[0].message
    (call,) = message.tool_calls or []
    assert first.choices[0].finish_reason == "tool_calls" and "tool_calls.function.arguments.delta" in kinds
    assert (call.function.name, json.loads(call.function.arguments)) == ("lookup", {"text": PROMPT})
    assert (message.model_extra or {}).get("reasoning_content", "").startswith("The user said 3 words")
    assert first.usage is not None and first.usage.completion_tokens_details is not None
    assert first.usage.completion_tokens_details.reasoning_tokens == 9
    messages += [message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}]
    second = client.chat.completions.create(model="echo", messages=messages, tools=TOOLS)
    assert (second.choices[0].message.content, second.choices[0].finish_reason) == ("sunny, 21C", "stop")


def test_the_openai_npm_package_runs_the_same_loop(url: str) -> None:
    result = run_agent_script("agent_loop.mjs", url + "/v1", PROMPT)
    assert (result["finish"], result["name"], json.loads(result["arguments"])) == ("tool_calls", "lookup", {"text": PROMPT})
    # The npm helper keeps the last piece of a field it does not know (reasoning_content), where
    # openai-python joins them: present either way, and the loop needs no more.
    assert result["reasoning"] and (result["answer"], result["last"]) == (f"looked up: {PROMPT}", "stop")


def test_chat_stream_runs_the_loop_with_the_message_event_and_resume_replays_it(url: str) -> None:
    auth = {"authorization": "Bearer k1"}
    body = {"messages": [{"role": "user", "content": PROMPT}], "tools": TOOLS, "reasoning_effort": "low"}
    first = stream("POST", url + "/chat/stream", json=body, headers=auth)
    names = first.names
    assert names[0] == "reasoning" and names.index("tool_call") > names.index("reasoning")
    assert names[-4:] == ["tool_call", "message", "usage", "done"] and first.of("done") == ["tool_calls"]
    assert "".join(first.of("reasoning")).startswith("The user said") and first.text == ""
    pieces = [json.loads(d) for d in first.of("tool_call")]
    assert (pieces[0]["name"], json.loads("".join(p["arguments"] for p in pieces))) == ("lookup", {"text": PROMPT})
    (message,) = [json.loads(d) for d in first.of("message")]
    assert message["tool_calls"][0]["id"] == pieces[0]["id"] and message["content"] is None
    stream_id = first.opened[0] if first.opened else ""
    again = stream("GET", url + "/chat/stream", headers={**auth, "last-event-id": f"{stream_id}.3"})
    assert again.events == first.events[3:]  # every new event, replayed losslessly
    result = {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "sunny, 21C"}
    second = stream("POST", url + "/chat/stream", json={**body, "messages": [*body["messages"], message, result]}, headers=auth)
    assert (second.text, second.of("done"), "message" in second.names) == ("sunny, 21C", ["stop"], True)  # it reasoned again
    plain = stream("POST", url + "/chat/stream", json={"messages": [{"role": "user", "content": "hi"}]}, headers=auth)
    assert plain.names == ["token", "usage", "done"]  # a text turn: no message event, as before


def test_a_tool_choice_naming_an_unknown_tool_is_a_400_naming_the_field(url: str) -> None:
    choice = {"type": "function", "function": {"name": "nope"}}
    bad = {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": choice}
    answer = httpx.post(url + "/chat/stream", json=bad, headers={"authorization": "Bearer k1"})
    assert answer.status_code == 400 and "tool_choice" in answer.json()["error"]["message"]


def test_the_ledger_row_records_the_reasoning_tokens(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    with serve({"USAGE_DB": str(db)}) as served:
        body = {"messages": [{"role": "user", "content": "a b c"}], "reasoning_effort": "high"}
        assert stream("POST", served.url + "/chat/stream", json=body).of("done") == ["stop"]
        stream("POST", served.url + "/chat/stream", json={"messages": [{"role": "user", "content": "a b c"}]})
    rows = sqlite3.connect(db).execute("SELECT completion_tokens, reasoning_tokens FROM usage ORDER BY started_at, rowid").fetchall()
    assert sorted(rows, key=str) == sorted([(12, 9), (3, None)], key=str)  # 9 pieces of reasoning, then 3 words


def test_langchain_runs_a_two_turn_tool_loop_on_v1(url: str, request: pytest.FixtureRequest) -> None:
    """An agent framework in Python: langchain-openai's ChatOpenAI with a bound
    tool, streamed, then the tool's result as a ToolMessage."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    def lookup(text: str) -> str:
        """Look the text up."""
        return f"looked up: {text}"

    http = httpx.Client()  # ours, to close: ChatOpenAI's own would be left to the collector
    request.addfinalizer(http.close)
    chat = ChatOpenAI(base_url=url + "/v1", api_key="k1", model="echo", max_retries=0, streaming=True, http_client=http)
    model = chat.bind_tools([lookup])
    history: list[Any] = [HumanMessage(PROMPT)]
    chunks = list(model.stream(history))
    turn = chunks[0]
    for chunk in chunks[1:]:
        turn = turn + chunk  # LangChain joins the streamed tool-call fragments by index
    (call,) = turn.tool_calls
    assert (call["name"], call["args"]) == ("lookup", {"text": PROMPT})
    history += [turn, ToolMessage(lookup(**call["args"]), tool_call_id=call["id"])]
    assert model.invoke(history).content == f"looked up: {PROMPT}"
