"""What a usage row costs the event loop, per store (none, SQLite, PostgreSQL):
a uvicorn gateway in a subprocess serves N short echo streams; the CPU time
of its event-loop thread and of the ledger's thread is read from /proc
before and after. Also: UsageLedger.add() alone, timed on the calling thread.

Run: python bench/ledger_cost.py [--streams 2000] [--rounds 3]
(PostgreSQL: a server of its own through tests/postgres_server.py, as root or not.)"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of `pid`'s event-loop (main) thread and of all its other threads."""
    seconds: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        name = "loop" if task.name == str(pid) else "others"  # the ledger's thread: the echo backend needs no other
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return seconds


async def run_streams(base: str, count: int, parallel: int = 20) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        pending = iter(range(count))

        async def worker() -> None:
            for _ in pending:
                response = await client.get("/chat/stream", params={"prompt": "a b c d e"})
                assert response.text.rstrip().endswith("data: stop"), response.text[-200:]

        await asyncio.gather(*(worker() for _ in range(parallel)))


def measure(usage_db: str, streams: int) -> dict[str, float]:
    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "USAGE_DB": usage_db, "ECHO_DELAY_SECONDS": "0", "RESUME_GRACE_SECONDS": "0",
           "MAX_STREAMS": "10000"}  # fmt: skip
    command = [sys.executable, "-m", "uvicorn", "asgi_stream:app", "--port", str(port), "--log-level", "warning", "--no-access-log",
               "--timeout-keep-alive", "60"]  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(base + "/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        asyncio.run(run_streams(base, 100))  # warm up: imports, connections, the table
        time.sleep(1)
        before = thread_cpu(server.pid)
        asyncio.run(run_streams(base, streams))
        time.sleep(2)  # let the ledger thread finish its last batch
        after = thread_cpu(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    used = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    return {
        "loop_us": used["loop"] / streams * 1e6,
        "others_us": used.get("others", 0.0) / streams * 1e6,
        "process_us": sum(used.values()) / streams * 1e6,
    }


def add_cost(rows: int = 100_000) -> float:
    """µs of the calling thread per UsageLedger.add(), the database made unreachable so nothing is written meanwhile."""
    import logging

    import anyio
    from ledger import UsageLedger

    logging.getLogger("asgi_stream.ledger").disabled = True  # the failure lines are expected here

    usage = UsageLedger("/nonexistent-dir/usage.db", max_waiting=rows + 1)
    row = {"stream_id": "x", "backend": "echo", "model": "echo"}

    async def adds() -> float:
        start = time.thread_time()
        for _ in range(rows):
            await usage.add(row)
        return (time.thread_time() - start) / rows * 1e6

    cost = anyio.run(adds)
    usage.close(0.1)
    return cost


def write_cost(target: str, batch: int = 50, batches: int = 40) -> float:
    """µs of the writing thread per row, in transactions of `batch` rows, the thread alone (no event loop beside it)."""
    from ledger import UsageLedger

    usage = UsageLedger(target)
    rows = [{"stream_id": f"w{i}-{time.monotonic_ns()}", "backend": "echo", "model": "echo"} for i in range(batch * (batches + 1))]
    usage.store.insert([usage._values(row) for row in rows[:batch]])  # connect and create the table first
    start = time.thread_time()
    for n in range(1, batches + 1):
        usage.store.insert([usage._values(row) for row in rows[n * batch : (n + 1) * batch]])
    cost = (time.thread_time() - start) / (batch * batches) * 1e6
    usage.store.reset()
    return cost


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write-only", action="store_true", help="only the store writes and add(), not the gateway runs")
    args = parser.parse_args()
    from tests.postgres_server import PostgresServer

    postgres = PostgresServer()
    postgres.start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            stores = {"none": "", "sqlite": str(Path(scratch) / "usage.db"), "postgres": postgres.url()}
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in stores}
            for _ in range(0 if args.write_only else args.rounds):  # the stores take turns: a load change on the machine hits each alike
                for name, target in stores.items():
                    runs[name].append(measure(target, args.streams))
            if not args.write_only:
                print(f"{args.streams} echo streams (5 tokens), 20 at a time; CPU µs per stream, median of {args.rounds} rounds")
                print(f"{'store':<10} {'loop thread':>12} {'other threads':>14} {'whole process':>14}")
            for name, each in runs.items() if not args.write_only else ():
                median = {key: statistics.median(run[key] for run in each) for key in each[0]}
                print(f"{name:<10} {median['loop_us']:>12.1f} {median['others_us']:>14.1f} {median['process_us']:>14.1f}")
            for name in ("sqlite", "postgres"):
                print(f"{name}: writing alone, 50 rows a transaction: {write_cost(stores[name]):.1f} µs of the thread per row")
    finally:
        postgres.remove()
    print(f"UsageLedger.add() alone, on the calling thread: {add_cost():.2f} µs")


if __name__ == "__main__":
    main()
