"""A timeline of a benchmark run, written by every Python process that
imports this (as `sitecustomize`, from PYTHONPATH or a `.pth` line) while
TIMELINE_LOG is set: one JSON line per event, times on the shared monotonic
clock, so that the processes' logs can be laid side by side
(bench/timeline/report.py). Not imported by the gateway or its tests.

Every process logs its cyclic collections over 1 ms (`gc`). The gateway
(a process that imports asgi_stream_core.gateway) also logs its event
loop's lag over 3 ms (`lag`, a task asleep 2 ms at a time), each
/chat/stream and /v1/chat/completions request (`request`: when the app was
called, when its first token was sent, when it ended) and each upstream
request of a probe stream, model bench-n5-d0 (`upstream`: from the start
of httpx's send to the response headers: the pool, the connect, the
upstream's answer).

The gateway, through a wrapper given as the harness's --project-python:

    printf '#!/bin/sh\\nexport PYTHONPATH=%s/bench/timeline TIMELINE_LOG=/tmp/timeline\\nexec %s/.venv/bin/python "$@"\\n' \\
        "$PWD" "$PWD" > /tmp/timeline-python && chmod +x /tmp/timeline-python
    ../shared/bench/run held --targets project,project-v1 --project . --project-python /tmp/timeline-python

The harness drops PYTHONPATH for its fake upstream; a `.pth` file in the
harness's venv reaches it (remove it afterwards):

    echo 'import os, runpy; os.environ.get("TIMELINE_LOG") and runpy.run_path("'$PWD'/bench/timeline/sitecustomize.py")' \\
        > ~/.cache/asgi-stream-bench/venv/lib/python3.11/site-packages/zz_timeline.pth
    TIMELINE_LOG=/tmp/timeline ../shared/bench/run held ...
"""

from __future__ import annotations

import gc
import importlib.abc
import importlib.util
import json
import os
import sys
import time
from typing import Any

LOG = os.environ.get("TIMELINE_LOG")


def start() -> None:
    with open("/proc/self/cmdline", "rb") as own:  # sys.argv is not set yet when a .pth line runs
        command = own.read()
    who = {"role": "upstream" if b"fake_upstream" in command else "harness"}  # the gateway says so itself
    out = open(f"{LOG}.{os.getpid()}", "a", buffering=1)  # open for the process's life

    def emit(**event: Any) -> None:
        out.write(json.dumps({"pid": os.getpid(), **who, **event}) + "\n")

    started: dict[int, float] = {}

    def collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[info["generation"]] = time.perf_counter()
        elif (began := started.pop(info["generation"], None)) is not None and time.perf_counter() - began > 0.001:
            emit(kind="gc", t=time.monotonic(), gen=info["generation"], ms=round((time.perf_counter() - began) * 1000, 2))

    gc.callbacks.append(collection)

    class GatewayHook(importlib.abc.MetaPathFinder):
        """Patches the gateway's module as it is first imported."""

        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name != "asgi_stream_core.gateway":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                run(module)
                who["role"] = "gateway"
                watch_gateway(module, emit)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, GatewayHook())


def watch_gateway(module: Any, emit: Any) -> None:
    import asyncio

    import httpx

    Gateway, lag_task = module.Gateway, []
    app_call, http_send = Gateway.__call__, httpx.AsyncClient.send

    async def lag() -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.002)
            if (late := loop.time() - before - 0.002) > 0.003:
                emit(kind="lag", t=time.monotonic(), ms=round(late * 1000, 2))

    async def call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if not lag_task:
            lag_task.append(asyncio.get_running_loop().create_task(lag()))
        if scope["type"] != "http" or scope["path"] not in ("/chat/stream", "/v1/chat/completions"):
            return await app_call(self, scope, receive, send)
        called, first = time.monotonic(), []

        async def watched(message: Any) -> None:
            if not first and message["type"] == "http.response.body" and b"tok0" in message.get("body", b""):
                first.append(time.monotonic())
            await send(message)

        try:
            await app_call(self, scope, receive, watched)
        finally:
            emit(kind="request", t=called, first=first[0] if first else None, end=time.monotonic(), path=scope["path"])

    async def upstream_send(self: Any, request: Any, **options: Any) -> Any:
        began = time.monotonic()
        response = await http_send(self, request, **options)
        if b"n5-d0" in (getattr(request, "_content", b"") or b""):
            emit(kind="upstream", t=began, headers=time.monotonic())
        return response

    Gateway.__call__, httpx.AsyncClient.send = call, upstream_send


if LOG:
    start()
