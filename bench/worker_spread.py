"""How `uvicorn --workers N` spreads connections over its workers: the
question behind issue 25's "1 -> 2 workers gave 1.70x, 1.65x and then 1.11x".

uvicorn's parent process binds one listening socket and every worker accepts
from it, so which worker takes a connection is a race between the workers
woken for it. This opens C connections at once (each a request the app holds
for --hold seconds, as a stream holds its connection), asks each which worker
(process id) answered, and repeats it --rounds times; the figure is how many
of the C the busiest worker took. Two workers and four connections, as in
the harness's 4-stream throughput run: a 2/2 split lets both cores work to
the end; 3/1 and 4/0 leave one core idle for part or all of the run.

    python bench/worker_spread.py --connections 4 --rounds 40
    python bench/worker_spread.py --connections 1000 --rounds 5 --loop asyncio
    python bench/worker_spread.py --connections 4 --rounds 40 --reuse-port

With --reuse-port there is no shared socket: N uvicorn processes each get a
socket of their own, bound to the same port with SO_REUSEPORT (`uvicorn --fd`),
and the kernel picks one for each new connection by a hash of its addresses.

The app is a few lines here, not the gateway: accepting happens in uvicorn
and the event loop before any app code runs, so the gateway cannot change it.
Run it with the bench extra installed (uvloop, httptools).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import free_port, wait_for_port

APP = '''
import os, anyio
HOLD = float(os.environ["SPREAD_HOLD"])
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await anyio.sleep(HOLD)
    pid = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(pid)).encode())]})
    await send({"type": "http.response.body", "body": pid})
'''


async def one_request(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    return answer.partition(b"\r\n\r\n")[2].decode()


async def one_round(port: int, connections: int) -> list[int]:
    pids = await asyncio.gather(*(one_request(port) for _ in range(connections)))
    return sorted(collections.Counter(pids).values(), reverse=True)


def reuse_port_socket(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    return listener


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--hold", type=float, default=0.3, help="seconds the app holds each request")
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    parser.add_argument("--reuse-port", action="store_true", help="a socket per worker, SO_REUSEPORT, no shared socket")
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "spread_app.py").write_text(APP)
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "spread_app:app", "--app-dir", folder, "--loop", args.loop,
                   "--http", "httptools", "--backlog", "4096", "--log-level", "warning", "--no-access-log"]  # fmt: skip
        environment = {**os.environ, "SPREAD_HOLD": str(args.hold)}
        if args.reuse_port:
            sockets = [reuse_port_socket(port) for _ in range(args.workers)]
            servers = [subprocess.Popen([*command, "--fd", str(s.fileno())], env=environment, pass_fds=[s.fileno()]) for s in sockets]
        else:
            servers = [subprocess.Popen([*command, "--port", str(port), "--workers", str(args.workers)], env=environment)]
        try:
            wait_for_port(port)
            time.sleep(1.0)  # every worker listening, not only the first
            splits = [asyncio.run(one_round(port, args.connections)) for _ in range(args.rounds)]
        finally:
            for server in servers:
                server.terminate()
                server.wait(10)
    busiest = collections.Counter(split[0] for split in splits)
    even = -(-args.connections // args.workers)
    sharing = "a socket each, SO_REUSEPORT" if args.reuse_port else "one shared socket (uvicorn --workers)"
    print(f"{args.workers} workers, {sharing}, {args.connections} connections at once, {args.rounds} rounds, loop {args.loop}")
    print("connections taken by the busiest worker: " + ", ".join(f"{n}: {busiest[n]} rounds" for n in sorted(busiest)))
    print(f"an even split ({even}) in {busiest[even]} of {args.rounds} rounds")


if __name__ == "__main__":
    main()
