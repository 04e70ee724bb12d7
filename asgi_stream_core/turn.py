"""One turn beyond its text: the reasoning and tool calls a generation
streams, as the events the record holds, and the assistant message that
lets the next request continue the turn. Pure: no clock, no task.

A tool call's first event waits until its name is known (some servers send
the id first and the name in a later chunk): the pieces before it are held
and go out joined in that first event, so every call's events are
`{index, id, name, arguments}` then `{index, arguments}`, and the arguments
of one index, joined, are exactly what the model wrote."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from providers import Reasoning, RoundTrip, ToolCallDelta, new_call_id


class Call:
    __slots__ = ("arguments", "id", "name", "opened")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []
        self.opened = False  # its first event is out


class Turn:
    __slots__ = ("calls", "reasoning")  # one per open stream

    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.calls: dict[int, Call] = {}

    def add(self, piece: Reasoning | ToolCallDelta) -> list[tuple[str, str]]:
        """The events (name, data) a piece makes: none while a call waits for its name."""
        if isinstance(piece, Reasoning):
            if not piece.text:
                return []
            self.reasoning.append(piece.text)
            return [("reasoning", piece.text)]
        call = self.calls.setdefault(piece.index, Call())
        call.id = call.id or piece.id
        call.name = call.name or piece.name
        call.arguments.append(piece.arguments)
        if call.opened:
            return [("tool_call", dumps({"index": piece.index, "arguments": piece.arguments}))] if piece.arguments else []
        if call.name is None:
            return []
        return [self.open(piece.index, call)]

    def open(self, index: int, call: Call) -> tuple[str, str]:
        call.opened, call.id = True, call.id or new_call_id()
        first = {"index": index, "id": call.id, "name": call.name or "", "arguments": "".join(call.arguments)}
        return "tool_call", dumps(first)

    def close(self) -> list[tuple[str, str]]:
        """At the end: the first events of calls whose name never came (named "")."""
        return [self.open(index, call) for index, call in sorted(self.calls.items()) if not call.opened]

    def message(self, content: Callable[[], str], round_trip: RoundTrip | None) -> dict[str, Any] | None:
        """The assistant message of this turn in the request's own shape; None
        for a turn of text alone (its `message` event is not sent). `content`
        is asked for only then: reading the text back from the record costs
        about 1,000 instructions a token (bench/instructions.py, burst)."""
        details = round_trip.reasoning_details if round_trip else []
        if not self.reasoning and not self.calls and not details:
            return None
        text = content()
        message: dict[str, Any] = {"role": "assistant", "content": text or (None if self.calls else "")}
        if self.calls:
            message["tool_calls"] = [self.tool_call(index, call, round_trip) for index, call in sorted(self.calls.items())]
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if details:
            message["reasoning_details"] = details
        return message

    @staticmethod
    def tool_call(index: int, call: Call, round_trip: RoundTrip | None) -> dict[str, Any]:
        function = {"name": call.name or "", "arguments": "".join(call.arguments)}
        made = {"id": call.id or "", "type": "function", "function": function}
        extra = round_trip.call_extras.get(index) if round_trip else None
        return {**made, "extra_content": extra} if extra else made


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
