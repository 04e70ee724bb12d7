"""`stop` and `top_p` reach every backend in that backend's own field, and
are left out of the upstream request when not given."""

from __future__ import annotations

from typing import Any

import pytest

from providers import ChatRequest, Upstream, anthropic, echo, gemini, ollama, openai

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: one two STOP three"}]
WITH = ChatRequest(MESSAGES, "x", "m", 9, top_p=0.25, stop=["STOP", "\n\n"])
WITHOUT = ChatRequest(MESSAGES, "x", "m", 9)
UPSTREAM = Upstream("http://127.0.0.1:1", "k")


def sampling_fields(backend: str, request: ChatRequest) -> tuple[Any, Any]:
    """(stop, top_p) as the backend's upstream request body carries them."""
    if backend == "openai":
        body = openai.build_request(UPSTREAM, request)[1]
        return body.get("stop"), body.get("top_p")
    if backend == "anthropic":
        body = anthropic.build_request(UPSTREAM, request)[1]
        return body.get("stop_sequences"), body.get("top_p")
    if backend == "ollama":
        options = ollama.build_request(UPSTREAM, request)[1]["options"]
        return options.get("stop"), options.get("top_p")
    config = gemini.build_request(UPSTREAM, request)[1]["generationConfig"]
    return config.get("stopSequences"), config.get("topP")


@pytest.mark.parametrize("backend", ["openai", "anthropic", "ollama", "gemini"])
def test_stop_and_top_p_go_in_each_backends_own_field(backend: str) -> None:
    assert sampling_fields(backend, WITH) == (["STOP", "\n\n"], 0.25)


@pytest.mark.parametrize("backend", ["openai", "anthropic", "ollama", "gemini"])
def test_stop_and_top_p_are_left_out_when_not_given(backend: str) -> None:
    assert sampling_fields(backend, WITHOUT) == (None, None)
    assert sampling_fields(backend, ChatRequest(MESSAGES, "x", "m", 9, stop=[])) == (None, None)


def test_the_other_fields_stay_where_they_were() -> None:
    body = anthropic.build_request(UPSTREAM, WITH)[1]
    assert body["system"] == "Be brief." and body["max_tokens"] == 9 and "stop" not in body
    assert ollama.build_request(UPSTREAM, WITH)[1]["options"]["num_predict"] == 9
    assert gemini.build_request(UPSTREAM, WITH)[1]["generationConfig"]["maxOutputTokens"] == 9


@pytest.mark.parametrize(
    ("text", "stop", "echoed"),
    [("one two STOP three", ["STOP"], "one two "), ("a b", ["zz"], "a b"), ("x.y!z", ["!", "."], "x"), ("ab", [], "ab")],
)
def test_echo_stops_before_the_first_stop_sequence(text: str, stop: list[str], echoed: str) -> None:
    assert echo.before_stop(text, stop) == echoed


@pytest.mark.anyio
async def test_echo_streams_only_what_precedes_the_stop_sequence() -> None:
    chunks = [c async for c in echo.stream_echo(None, Upstream(""), WITH)]  # type: ignore[arg-type]  # echo needs no client
    assert "".join(c for c in chunks if isinstance(c, str)) == "Count: one two "
