"""The turn accumulator (asgi_stream_core/turn.py), pure: a tool call's
events join to exactly what the model wrote, whatever the split and however
parallel calls interleave, and its first event waits for its name."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from asgi_stream_core.turn import Turn
from providers import Reasoning, RoundTrip, ToolCallDelta

json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)  # fmt: skip


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@given(st.lists(st.tuples(json_values, st.lists(st.integers(0, 80), max_size=6)), min_size=1, max_size=3), st.randoms())
def test_any_split_and_interleaving_of_parallel_calls_joins_to_each_calls_arguments(
    calls: list[tuple[object, list[int]]], random: object
) -> None:
    turn, events = Turn(), []
    arguments = [orjson.dumps({"value": value}).decode() for value, _ in calls]
    queues = [[ToolCallDelta(i, f"call_{i}", f"tool_{i}", "")] + [ToolCallDelta(i, arguments=p) for p in split(a, cuts)]
              for i, (a, (_, cuts)) in enumerate(zip(arguments, calls, strict=True))]  # fmt: skip
    while any(queues):
        queue = random.choice([q for q in queues if q])  # type: ignore[attr-defined]
        events += turn.add(queue.pop(0))
    events += turn.close()
    pieces = [orjson.loads(data) for name, data in events if name == "tool_call"]
    for i, expected in enumerate(arguments):
        mine = [p for p in pieces if p["index"] == i]
        assert (mine[0]["id"], mine[0]["name"]) == (f"call_{i}", f"tool_{i}") and all("id" not in p for p in mine[1:])
        assert "".join(p["arguments"] for p in mine) == expected
    message = turn.message(lambda: "", None)
    assert message is not None and [c["function"]["arguments"] for c in message["tool_calls"]] == arguments


def test_a_call_whose_name_comes_later_is_held_until_then_with_nothing_lost() -> None:
    turn = Turn()
    assert turn.add(ToolCallDelta(0, "call_x", None, '{"a"')) == []  # id first: held
    assert turn.add(ToolCallDelta(0, None, None, ": 1")) == []
    (first,) = turn.add(ToolCallDelta(0, None, "lookup", "}"))
    assert orjson.loads(first[1]) == {"index": 0, "id": "call_x", "name": "lookup", "arguments": '{"a": 1}'}
    assert turn.add(ToolCallDelta(0, None, "lookup", "")) == []  # a repeated name adds nothing


def test_reasoning_is_its_own_event_and_a_text_only_turn_has_no_message() -> None:
    assert Turn().message(lambda: "just text", None) is None
    turn = Turn()
    assert turn.add(Reasoning("think ")) == [("reasoning", "think ")] and turn.add(Reasoning("")) == []
    signed = {"type": "reasoning.text", "text": "think ", "signature": "sig", "index": 0}
    assert turn.message(lambda: "answer", RoundTrip([signed])) == {
        "role": "assistant", "content": "answer", "reasoning_content": "think ", "reasoning_details": [signed]}


def test_a_call_that_never_got_a_name_still_goes_out_at_the_end() -> None:
    turn = Turn()
    assert turn.add(ToolCallDelta(3, None, None, "{}")) == []
    ((name, data),) = turn.close()
    piece = orjson.loads(data)
    assert name == "tool_call" and piece["name"] == "" and piece["arguments"] == "{}" and piece["id"].startswith("call_")
