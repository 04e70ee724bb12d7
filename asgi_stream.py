"""asgi-stream: one handwritten ASGI callable that streams LLM tokens to HTTP
clients as Server-Sent Events, keeps provider keys on the server, and stops
the upstream generation when nobody is listening any more.

This module is what a server loads (`uvicorn asgi_stream:app`) and what
`python -m asgi_stream` runs. The rest lives in `asgi_stream_core/`, one room
a job; read it in the order a request walks through it:

    types.py, config.py       below everything: ASGI aliases, the one Refusal, the settings and the backend table
    routing.py                CONFIG_FILE's named upstreams and model aliases, read for config.py
    gateway.py, routes.py     the ASGI callable: lifespan, routing table, API keys, CORS, refusals
    web.py                    the I/O every route shares: body, JSON check, CORS headers, one response writer
    chat_stream.py            our front door: parse (chat_request.py), admit, start / resume / cancel
    openai_api.py             OpenAI's front door over the same generation and record; the answer
                              path of every door without resume (the status waits for the first output)
    anthropic_api.py          Anthropic's Messages API as a front door (/v1/messages)
    responses_api.py          OpenAI's Responses API (/v1/responses), its state in stores/responses.py
    chat_shape.py             the chat shape beyond text (parts, tool calls, tools, effort, JSON output), validated once
    services.py               what every exchange shares, and admission (the stream limits)
    generation.py             provider chunks -> the stream record, under the deadlines; the ending; the accounting
    turn.py                   reasoning and tool-call pieces -> events, and the turn's message (pure)
    record.py, event_log.py   the stream record over a pure event log; framers turn its events into bytes
    sse.py                    SSE framing (pure)
    reader.py                 one client: the writer (record -> send) and the watcher (disconnect, heartbeat, send timeout)
    metrics.py, ledger.py     what is counted of every stream; the usage ledger
    stores/                   where records live: this process (memory) or every replica (redis)
    upstream_client.py        the one shared httpx client
    connections.py            uvicorn's HTTP protocol with a head deadline and a connection bound
    access_log.py             uvicorn's access log without the query (no prompt, no key)
    collector.py              Python's cyclic collector while serving: the young by time, everything by heap growth
    workers.py                WORKERS=N: a process per core, each with a listening socket of its own
    ../providers/             one module per upstream wire format
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from asgi_stream_core.config import ConfigError, load_config, number
from asgi_stream_core.gateway import Gateway
from asgi_stream_core.ledger import usage_report
from asgi_stream_core.workers import listening_sockets, supervise

__all__ = ["Gateway", "app", "main"]

app = Gateway()
HTTP_PROTOCOL = "asgi_stream_core.connections:HttpProtocol"  # uvicorn's, with a head deadline and a connection bound


def main(argv: list[str]) -> int:
    """`python -m asgi_stream` serves; `python -m asgi_stream usage` sums the ledger."""
    try:
        config = load_config(os.environ)
        port = int(number(os.environ, "PORT", 8000, 1))
        workers = int(number(os.environ, "WORKERS", 1, 1))
    except ConfigError as exc:
        print(f"asgi-stream: {exc}", file=sys.stderr)
        return 2
    if argv[1:2] == ["usage"]:
        return usage_report(argv[2:], config.usage_db)
    host = os.environ.get("HOST", "127.0.0.1")
    # The image's CMD and the README's uvicorn line set the same: connections bounded (asgi_stream_core/connections.py)
    options: dict[str, Any] = {"timeout_graceful_shutdown": 5, "log_level": "info", "http": HTTP_PROTOCOL}
    if workers > 1:  # a socket per worker, not uvicorn's shared one: asgi_stream_core/workers.py says why
        listeners = listening_sockets(host, port, workers)
        print(f"asgi-stream: {workers} workers on http://{host}:{port}", file=sys.stderr)  # uvicorn, given sockets, names no address
        return supervise(listeners, {"app": "asgi_stream:app", **options})
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    uvicorn.run(app, host=host, port=port, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
