"""Worker processes for `WORKERS=N python -m asgi_stream`: each with a listening
socket of its own on the one port (SO_REUSEPORT), so the kernel spreads the
connections over them.

Why not `uvicorn --workers N`: uvicorn binds one socket and its workers race
to accept from it, and the race is lopsided (bench/worker_spread.py, 2 workers
on 2 cores): four connections opened at once all went to one worker in 16-18
of 40 rounds and were split two and two in only 9-11; of 1,000, one worker took
508 to 928. That is issue 25's third throughput run, 1.11x for two workers. With
a socket each, the kernel picks one for every new connection by a hash of its
addresses: 1,000 split between 505/495 and 531/469, and four two and two in 17
of 40 rounds, what chance gives (6 of 16 outcomes). The hash does not see
load, so a handful of long streams can still land unevenly; many spread evenly.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

__all__ = ["listening_sockets", "serve_worker", "supervise"]


def listening_sockets(host: str, port: int, count: int, backlog: int = 2048) -> list[socket.socket]:
    """`count` sockets listening on one address, each with its own accept queue. Bound
    here, before any worker starts, so an address in use stops startup once, plainly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return [socket.create_server((host, port), family=family, backlog=backlog, reuse_port=True) for _ in range(count)]


def serve_worker(listener: socket.socket, uvicorn_options: dict[str, Any]) -> None:
    """One worker process: uvicorn serving on its own socket (the app given by import string)."""
    import logging

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    uvicorn.Server(uvicorn.Config(**uvicorn_options)).run(sockets=[listener])


def supervise(listeners: list[socket.socket], uvicorn_options: dict[str, Any]) -> int:
    """Serves with a worker process per socket until a stop is asked (SIGTERM or SIGINT:
    passed on to every worker as SIGTERM, each ends its streams as uvicorn does) or a
    worker ends by itself. Then the others are stopped too and the exit code says which:
    0 after a stop, 1 when a worker ended on its own. No worker is restarted here: the
    service manager that restarts one process restarts this one whole."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state of the parent's loop
    workers = [context.Process(target=serve_worker, args=(listener, uvicorn_options), daemon=True) for listener in listeners]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None:  # started
                worker.terminate()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker in workers:
            worker.start()
        if stopping:  # asked to stop while they were starting: those not yet started then are stopped now
            stop(signal.SIGTERM, None)
        for listener in listeners:
            listener.close()  # the workers hold their copies
        wait([worker.sentinel for worker in workers])
        ended_by_itself = not stopping
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 1 if ended_by_itself else 0
