"""The runner: starts the fake upstream and the gateway under uvicorn (each in
its own process, on 127.0.0.1), drives the scenarios, and prints the
gateway's CPU per token (from /proc, utime+stime), tokens per second,
first-token overhead over calling the upstream directly, RSS per open
stream and disconnect-to-cancel latency. Every wait has a deadline.

    python bench/run.py                  # all scenarios, ~1.5 min
    python bench/run.py ttft fanout --streams 500 --json out.json
    python bench/run.py disconnect --slow 4   # the gateway as on a machine ~4x slower

`--slow N` pins the gateway to one core (`--slow-core`, default 1) beside
N-1 busy loops, as /work/shared/tools/slowly does, so it gets about 1/N of
that core; the loops are not the gateway's children, so its CPU figures stay
its own. Timing-dependent paths (cancel, first token) then behave as on a
slow machine; compare a change at both speeds.

A script, not a package: `python -m bench` stays the shared harness's name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadgen import Stream, fetch_json, gateway_request, run_stream, upstream_request

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("throughput", "fanout", "ttft", "disconnect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


class Processes:
    """The fake upstream and the gateway, started once, stopped at the end."""

    def __init__(self, workdir: str, slow: int = 1, slow_core: int = 1):
        self.upstream_port, self.gateway_port = free_port(), free_port()
        self.upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(self.upstream_port)],
                                         cwd=ROOT, stdout=subprocess.DEVNULL)
        env = {**os.environ, "OPENAI_BASE_URL": f"http://127.0.0.1:{self.upstream_port}/v1", "OPENAI_API_KEY": "bench",
               "MAX_TOKENS_LIMIT": "1000000", "MAX_STREAMS": "100000", "MAX_STREAMS_PER_KEY": "100000",
               "RESUME_GRACE_SECONDS": "0", "USAGE_DB": str(Path(workdir) / "usage.db")}
        loop = ["--loop", "uvloop"] if has("uvloop") else []
        http = ["--http", "httptools"] if has("httptools") else []
        self.gateway_log = open(Path(workdir) / "gateway.log", "w")
        pinned = ["taskset", "-c", str(slow_core)] if slow > 1 else []
        self.busy = [subprocess.Popen([*pinned, sys.executable, "-c", "while True: pass"]) for _ in range(slow - 1)]
        self.gateway = subprocess.Popen(
            [*pinned, sys.executable, "-m", "uvicorn", "asgi_stream:app", "--host", "127.0.0.1", "--port", str(self.gateway_port),
             *loop, *http, "--no-access-log", "--backlog", "4096", "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=self.gateway_log, stderr=subprocess.STDOUT)
        for port in (self.upstream_port, self.gateway_port):
            wait_for_port(port)

    def stop(self) -> None:
        for process in (self.gateway, self.upstream, *self.busy):
            process.terminate()
        for process in (self.gateway, self.upstream, *self.busy):
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
        self.gateway_log.close()


def wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on 127.0.0.1:{port}; see the gateway log") from None
            time.sleep(0.05)


class Bench:
    def __init__(self, procs: Processes, args: argparse.Namespace):
        self.procs, self.args = procs, args
        self.pid = procs.gateway.pid
        self.results: dict[str, Any] = {}

    def through_gateway(self, model: str, n: int, bench_id: str, **options: Any) -> Any:
        raw = gateway_request(self.procs.gateway_port, model, n, bench_id)
        return run_stream(self.procs.gateway_port, raw, Stream(bench_id), **options)

    def direct(self, model: str, n: int, bench_id: str) -> Any:
        raw = upstream_request(self.procs.upstream_port, model, n, bench_id)
        return run_stream(self.procs.upstream_port, raw, Stream(bench_id), direct=True)

    async def warm_up(self) -> None:
        for i in range(20):
            stream = await self.through_gateway("n20-d0", 20, f"warm{i}")
            if not stream.done or stream.tokens != 20:
                raise SystemExit(f"the gateway's warm-up stream came back wrong: {stream}")

    async def throughput(self) -> None:
        """1 and 4 parallel streams of 20,000 tokens at full speed."""
        out: dict[str, Any] = {}
        for parallel in (1, 4):
            cpu_per_token, rates = [], []
            for rep in range(self.args.reps):
                cpu0, t0 = cpu_seconds(self.pid), time.monotonic()
                streams = await asyncio.gather(*(self.through_gateway("n20000-d0", 20000, f"tp{parallel}.{rep}.{i}")
                                                 for i in range(parallel)))
                wall, cpu = time.monotonic() - t0, cpu_seconds(self.pid) - cpu0
                tokens = sum(s.tokens for s in streams)
                assert all(s.done for s in streams), "a throughput stream did not finish"
                cpu_per_token.append(cpu / tokens * 1e6)
                rates.append(tokens / wall)
            out[f"{parallel}x"] = {"cpu_us_per_token": statistics.median(cpu_per_token), "tokens_per_s": statistics.median(rates)}
        self.results["throughput"] = out

    async def fanout(self) -> None:
        """N streams of 200 tokens, 20 ms apart, all opened at once."""
        n, count = 200, self.args.streams
        await fetch_json(self.procs.upstream_port, "POST", "/stats/reset")
        idle = rss_mib(self.pid)
        peak, sampling = [idle], True

        async def sample() -> None:
            while sampling:
                peak.append(rss_mib(self.pid))
                await asyncio.sleep(0.025)

        sampler = asyncio.create_task(sample())
        cpu0, t0 = cpu_seconds(self.pid), time.monotonic()
        budget = n * 0.02 + self.args.fanout_budget
        streams = await asyncio.gather(*(self.through_gateway("n200-d20", n, f"fan{i}", timeout=budget) for i in range(count)))
        wall, cpu = time.monotonic() - t0, cpu_seconds(self.pid) - cpu0
        sampling = False
        await sampler
        tokens = sum(s.tokens for s in streams)
        ttfts = [s.ttft * 1000 if s.ttft is not None else float("inf") for s in streams]
        gaps = [g * 1000 for s in streams for g in s.gaps]
        self.results["fanout"] = {
            "streams": count, "done": sum(s.done for s in streams), "tokens": tokens,
            "cpu_us_per_token": cpu / max(tokens, 1) * 1e6, "tokens_per_s": tokens / wall, "demanded_tokens_per_s": count * 50,
            "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99), "gap_p99_ms": pct(gaps, 99),
            "idle_rss_mib": idle, "peak_rss_mib": max(peak), "kib_per_stream": (max(peak) - idle) * 1024 / count,
        }

    async def ttft(self) -> None:
        """Sequential 5-token streams, through the gateway and straight to the upstream."""
        via, direct = [], []
        for rnd in range(4):
            for i in range(self.args.ttft_requests // 4):
                g = await self.through_gateway("n5-d0", 5, f"tt{rnd}.{i}")
                d = await self.direct("n5-d0", 5, f"td{rnd}.{i}")
                if g.ttft is not None and d.ttft is not None:
                    via.append(g.ttft * 1000)
                    direct.append(d.ttft * 1000)
        self.results["ttft"] = {
            "requests": len(via), "gateway_p50_ms": pct(via, 50), "gateway_p99_ms": pct(via, 99),
            "direct_p50_ms": pct(direct, 50), "direct_p99_ms": pct(direct, 99),
            "overhead_p50_ms": pct(via, 50) - pct(direct, 50), "overhead_p99_ms": pct(via, 99) - pct(direct, 99),
        }

    async def disconnect(self) -> None:
        """200 streams of 2,000 tokens at 10 ms; the client hangs up after 5."""
        await fetch_json(self.procs.upstream_port, "POST", "/stats/reset")
        tasks = []
        for wave in range(10):
            tasks += [asyncio.create_task(self.through_gateway("n2000-d10", 2000, f"dc{wave}.{i}", close_after=5))
                      for i in range(20)]
            await asyncio.sleep(0.25)
        streams = {s.bench_id: s for s in await asyncio.gather(*tasks)}
        deadline = time.monotonic() + 30
        while True:
            stats = await fetch_json(self.procs.upstream_port, "GET", "/stats")
            if not stats["running"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        latencies = [(u["end"] - streams[u["id"]].closed) * 1000 for u in stats["streams"]  # type: ignore[attr-defined]
                     if u["state"] == "cancelled" and u["id"] in streams and streams[u["id"]].closed]
        self.results["disconnect"] = {
            "streams": len(streams), "upstream_cancelled": stats["cancelled"], "upstream_ran_to_end": stats["completed"],
            "upstream_still_running": stats["running"], "cancel_p50_ms": pct(latencies, 50), "cancel_p99_ms": pct(latencies, 99),
            "cancel_max_ms": max(latencies, default=float("nan")),
            "upstream_tokens_per_stream": statistics.fmean(u["sent"] for u in stats["streams"]),  # type: ignore[index]
        }


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "nproc": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()}


def report(results: dict[str, Any]) -> str:
    lines = [f"machine: {results['machine']['cpu']}, {results['machine']['nproc']} cores, Python {results['machine']['python']}"
             + (f"; gateway slowed {results['slow']}x (one core, {results['slow'] - 1} busy loops)" if results["slow"] > 1 else "")]
    if t := results.get("throughput"):
        for k, v in t.items():
            lines.append(f"throughput {k} (20,000 tokens, no delay): {v['cpu_us_per_token']:.1f} µs CPU/token, "
                         f"{v['tokens_per_s']:,.0f} tok/s")
    if f := results.get("fanout"):
        lines.append(f"fanout {f['streams']} streams x 200 tokens at 20 ms: {f['cpu_us_per_token']:.1f} µs CPU/token, "
                     f"{f['tokens_per_s']:,.0f} of {f['demanded_tokens_per_s']:,} tok/s, done {f['done']}/{f['streams']}, "
                     f"TTFT p50 {f['ttft_p50_ms']:.1f} ms p99 {f['ttft_p99_ms']:.1f} ms, gap p99 {f['gap_p99_ms']:.1f} ms, "
                     f"RSS {f['idle_rss_mib']:.1f} -> {f['peak_rss_mib']:.1f} MiB = {f['kib_per_stream']:.1f} KiB/stream")
    if t := results.get("ttft"):
        lines.append(f"ttft ({t['requests']} sequential): first-token overhead over direct p50 {t['overhead_p50_ms']:+.2f} ms, "
                     f"p99 {t['overhead_p99_ms']:+.2f} ms (gateway p50 {t['gateway_p50_ms']:.2f}, direct p50 {t['direct_p50_ms']:.2f})")
    if d := results.get("disconnect"):
        lines.append(f"disconnect ({d['streams']} streams, hang-up after 5 tokens): upstream cancelled {d['upstream_cancelled']}, "
                     f"ran to end {d['upstream_ran_to_end']}, still running {d['upstream_still_running']}; cancel latency "
                     f"p50 {d['cancel_p50_ms']:.2f} ms, p99 {d['cancel_p99_ms']:.2f} ms, max {d['cancel_max_ms']:.2f} ms; "
                     f"the upstream sent {d['upstream_tokens_per_stream']:.1f} tokens a stream (5 reached the client)")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of sockets; children inherit it
    with tempfile.TemporaryDirectory(prefix="asgi-stream-bench-") as workdir:
        procs = Processes(workdir, args.slow, args.slow_core)
        try:
            bench = Bench(procs, args)
            await bench.warm_up()
            # fanout first: its RSS per stream needs a process that has not served a bigger load
            for name in sorted(args.scenarios, key=lambda s: s != "fanout"):
                print(f"running {name} ...", file=sys.stderr, flush=True)
                await getattr(bench, name)()
            return {"machine": machine(), "slow": args.slow, **bench.results}
        finally:
            procs.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    parser.add_argument("--streams", type=int, default=1000, help="fanout concurrency (default 1000)")
    parser.add_argument("--reps", type=int, default=3, help="throughput repetitions (median)")
    parser.add_argument("--ttft-requests", type=int, default=200)
    parser.add_argument("--fanout-budget", type=float, default=30, help="seconds past nominal before fanout streams are cut")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--slow", type=int, default=1, metavar="N", help="run the gateway as on a machine N times slower")
    parser.add_argument("--slow-core", type=int, default=1, help="the core the slowed gateway is pinned to (default 1)")
    args = parser.parse_args(argv)
    args.scenarios = args.scenarios or list(SCENARIOS)
    try:
        import uvloop
    except ImportError:
        results = asyncio.run(run(args))
    else:
        results = uvloop.run(run(args))
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
