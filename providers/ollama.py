"""Ollama's native chat API (PROVIDERS.md 6): `POST /api/chat` with the whole
conversation (not `/api/generate` with the last message: that loses the
turns and the model's chat template), answered in NDJSON, done at `done:true`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from functools import partial
from typing import Any

import httpx

from . import ChatRequest, Chunk, Upstream, UpstreamError, body_pieces, field_of, final_for, json_object, make_usage, open_stream
from .lines import LineSplitter, ReadToEOF, split_ndjson

DEFAULT_MODEL = "llama3.2"
FINISH_REASONS = {"stop": "stop", "length": "length", "": "stop"}  # no done_reason on a done line: a stop


def build_request(upstream: Upstream, request: ChatRequest) -> tuple[str, dict[str, Any], dict[str, str]]:
    options: dict[str, Any] = {"num_predict": request.max_tokens}
    if request.temperature is not None:
        options["temperature"] = request.temperature
    if request.top_p is not None:
        options["top_p"] = request.top_p
    if request.stop:
        options["stop"] = request.stop
    body = {"model": request.model, "messages": request.messages, "stream": True, "options": options}
    headers = {"content-type": "application/json", "accept": "application/x-ndjson"}
    return upstream.base_url.rstrip("/") + "/api/chat", body, headers


async def stream_ollama(http: httpx.AsyncClient, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Chunk, None]:
    splitter = LineSplitter()
    final: Chunk | None = None  # read on to EOF once it is known
    async with open_stream(http, *build_request(upstream, request)) as response:
        async for lines in ReadToEOF(body_pieces(response), partial(split_ndjson, splitter), partial(split_ndjson, splitter, None)):
            for line in lines:
                if final:
                    continue  # after the done line: read to EOF, ignore
                data = json_object(line, "a line")
                if error := data.get("error"):  # after a 200: the stream's only failure report
                    raise UpstreamError("upstream_error", str(error))
                text = field_of(data, "message", "content")  # message.thinking is not answer text
                if isinstance(text, str) and text:
                    yield text
                if data.get("done") is True:
                    reason = data.get("done_reason")
                    usage = make_usage(data.get("prompt_eval_count"), data.get("eval_count"))  # 0 counts are omitted
                    final = final_for(reason if isinstance(reason, str) else "", FINISH_REASONS, usage)
    if final is None:
        raise UpstreamError("protocol_error", "the upstream stream ended before its done line")
    yield final
