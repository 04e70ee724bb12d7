"""CPU cost in machine instructions, which the load of other jobs does not
change (wall-clock and even CPU seconds swing 10x on a shared machine): the
gateway (or the shared harness's relay) runs under callgrind, counters are
zeroed after warm-up and dumped after each window. Needs valgrind.

    python bench/instructions.py                   # the project (this checkout)
    python bench/instructions.py --relay /work/shared/bench/apps/relay_app.py

Windows: `start` = 40 sequential 1-token streams (instructions per request:
the start path plus one token and the end); `spaced` = 1 stream of 300
tokens 30 ms apart (a token per wake-up, as in fanout); `burst` = 1 stream
of 4,000 tokens at full speed (throughput); `cancel` = 40 sequential
streams whose client hangs up after 5 tokens 10 ms apart (per stream: the
start, 5 spaced tokens, the disconnect and the upstream's cancel). Run it with the harness's venv
(uvloop, httptools), e.g. ~/.cache/asgi-stream-bench/venv/bin/python.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadgen import Stream, gateway_request, run_stream
from run import ROOT, free_port, wait_for_port

# streams (one after another), tokens, ms apart, tokens after which the client hangs up (None: to the end)
WINDOWS = {"start": (40, 1, 0, None), "spaced": (1, 300, 30, None), "burst": (1, 4000, 0, None), "cancel": (40, 2000, 10, 5)}


def instructions(pid: int, out: Path) -> int:
    """Dump the counters since the last zeroing and read their total."""
    before = set(out.parent.glob(out.name + "*"))
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while not (new := set(out.parent.glob(out.name + "*")) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # the dump is written in pieces
    for line in Path(max(new)).read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit("no total in the callgrind dump")


async def measure(app: str, app_dir: Path, direct: bool, windows: list[str]) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="instructions-"))
    up_port, gw_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(up_port)],
                                stdout=subprocess.DEVNULL)
    env = {**os.environ, "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1", "OPENAI_API_KEY": "bench", "MAX_TOKENS_LIMIT": "1000000",
           "RESUME_GRACE_SECONDS": "0", "USAGE_DB": "", "PYTHONPATH": str(app_dir)}
    out = work / "callgrind.out"
    gateway = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m", "uvicorn", app,
                                "--port", str(gw_port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                                "--log-level", "warning"],
                               cwd=app_dir, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "gateway.log", "w"))
    try:
        wait_for_port(up_port)
        wait_for_port(gw_port, timeout=300)

        async def stream(n: int, ms: int, name: str, close_after: int | None = None) -> Stream:
            request = gateway_request(gw_port, f"n{n}-d{ms}", n, name)
            s = await run_stream(gw_port, request, Stream(name), direct=direct, close_after=close_after, timeout=600)
            assert (s.done and s.tokens == n) if close_after is None else s.tokens >= close_after, s
            return s

        for i in range(5):
            await stream(20, 0, f"warm{i}")
        results = {}
        for window in windows:
            count, n, ms, close_after = WINDOWS[window]
            subprocess.run(["callgrind_control", "--zero", str(gateway.pid)], check=True, capture_output=True)
            for i in range(count):
                await stream(n, ms, f"{window}{i}", close_after)
            if close_after is not None:
                await asyncio.sleep(2)  # the gateway's unwinding after the hang-up is part of the window
            total = instructions(gateway.pid, out)
            results[window] = total / (n if count == 1 else count)
        return results
    finally:
        for process in (gateway, upstream):
            process.terminate()
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relay", help="measure this relay app file (the shared harness's) instead of the project")
    parser.add_argument("--project", default=str(ROOT), help="the checkout to measure (default: this one)")
    parser.add_argument("--windows", nargs="+", choices=list(WINDOWS), default=list(WINDOWS), help="measure only these windows")
    args = parser.parse_args()
    if args.relay:
        relay = Path(args.relay).resolve()
        results = asyncio.run(measure(f"{relay.stem}:app", relay.parent, direct=True, windows=args.windows))
    else:
        results = asyncio.run(measure("asgi_stream:app", Path(args.project).resolve(), direct=False, windows=args.windows))
    units = {window: "request" if WINDOWS[window][0] > 1 else "token" for window in results}
    print("  ".join(f"{window}: {value / 1000:,.1f} k instr/{units[window]}" for window, value in results.items()))


if __name__ == "__main__":
    main()
