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
    python bench/run.py throughput fanout --stores memory,redis   # both stores, same run

With `--stores memory,redis` one gateway per store runs beside the other (the
redis one with REDIS_URL on a redis-server started here, persistence off), and
each scenario runs on each in turn, so their ratio is measured on the same
machine state. For the redis store it also reports the redis-server's own CPU,
Redis commands per token (INFO commandstats) and Redis bytes per held stream
(MEMORY USAGE of every key left after fanout, over the streams held).

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
from collections import Counter
from pathlib import Path
from typing import Any

from loadgen import Stream, fetch_json, gateway_request, run_stream, upstream_request

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("throughput", "fanout", "ttft", "disconnect")
OPTIONAL = ("held",)  # only when named: Redis bytes per finished stream


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


class Redis:
    """A redis-server for the redis store, on a free loopback port, no persistence."""

    def __init__(self, workdir: str):
        self.port = free_port()
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
        wait_for_port(self.port)

    def cli(self, *args: str) -> str:  # a separate client: its own commands are not the gateway's
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, check=True).stdout

    def commands(self) -> int:
        """Commands served so far (INFO commandstats, every command; a pipeline counts each of its commands)."""
        return sum(int(line.split("calls=")[1].split(",")[0]) for line in self.cli("INFO", "commandstats").splitlines()
                   if line.startswith("cmdstat_"))

    def held_bytes(self) -> tuple[int, int]:
        """MEMORY USAGE summed over every key, and the number of streams held (their :meta keys)."""
        keys = [key for key in self.cli("--scan").splitlines() if key]
        commands = "".join(f"MEMORY USAGE {key} SAMPLES 0\n" for key in keys)  # one redis-cli for all of them
        replies = subprocess.run(["redis-cli", "-p", str(self.port)], input=commands, capture_output=True, text=True, check=True).stdout
        total = sum(int(line) for line in replies.split() if line.isdigit())
        return total, sum(key.endswith(":meta") for key in keys)


class Processes:
    """The fake upstream and one gateway per store, started once, stopped at the end."""

    def __init__(self, workdir: str, stores: list[str], slow: int = 1, slow_core: int = 1):
        self.upstream_port = free_port()
        self.upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(self.upstream_port)],
                                         cwd=ROOT, stdout=subprocess.DEVNULL)
        self.redis = Redis(workdir) if "redis" in stores else None
        self.gateways: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
        self.logs = []
        pinned = ["taskset", "-c", str(slow_core)] if slow > 1 else []
        self.busy = [subprocess.Popen([*pinned, sys.executable, "-c", "while True: pass"]) for _ in range(slow - 1)]
        for store in stores:
            port = free_port()
            env = {**os.environ, "OPENAI_BASE_URL": f"http://127.0.0.1:{self.upstream_port}/v1", "OPENAI_API_KEY": "bench",
                   "MAX_TOKENS_LIMIT": "1000000", "MAX_STREAMS": "100000", "MAX_STREAMS_PER_KEY": "100000",
                   "RESUME_GRACE_SECONDS": "0", "USAGE_DB": str(Path(workdir) / f"usage-{store}.db"),
                   "REDIS_URL": f"redis://127.0.0.1:{self.redis.port}/0" if store == "redis" and self.redis else ""}
            loop = ["--loop", "uvloop"] if has("uvloop") else []
            http = ["--http", "httptools"] if has("httptools") else []
            log = open(Path(workdir) / f"gateway-{store}.log", "w")
            self.logs.append(log)
            self.gateways[store] = (port, subprocess.Popen(
                [*pinned, sys.executable, "-m", "uvicorn", "asgi_stream:app", "--host", "127.0.0.1", "--port", str(port),
                 *loop, *http, "--no-access-log", "--backlog", "4096", "--log-level", "warning"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        for port in (self.upstream_port, *(port for port, _ in self.gateways.values())):
            wait_for_port(port)

    def stop(self) -> None:
        processes = [process for _, process in self.gateways.values()] + [self.upstream] + self.busy
        processes += [self.redis.process] if self.redis else []
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in self.logs:
            log.close()


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
    def __init__(self, procs: Processes, args: argparse.Namespace, store: str):
        self.procs, self.args, self.store = procs, args, store
        self.port, gateway = procs.gateways[store]
        self.pid = gateway.pid
        self.redis = procs.redis if store == "redis" else None
        self.results: dict[str, Any] = {}

    def through_gateway(self, model: str, n: int, bench_id: str, **options: Any) -> Any:
        raw = gateway_request(self.port, model, n, bench_id)
        return run_stream(self.port, raw, Stream(bench_id), **options)

    async def scenario(self, name: str) -> None:
        """Run one scenario; for the redis store, add Redis's share of the work."""
        if self.redis is None:
            return await getattr(self, name)()
        redis_pid = self.redis.process.pid
        calls0, cpu0 = self.redis.commands(), cpu_seconds(redis_pid)
        await getattr(self, name)()
        calls, cpu = self.redis.commands() - calls0, cpu_seconds(redis_pid) - cpu0
        figures = self.results.get(name, {})
        tokens = figures.get("tokens") or sum(v.get("tokens", 0) for v in figures.values() if isinstance(v, dict))
        figures["redis"] = {"commands": calls, "commands_per_token": calls / max(tokens, 1),
                            "redis_server_cpu_us_per_token": cpu / max(tokens, 1) * 1e6}
        if name == "held":
            held, streams = self.redis.held_bytes()
            figures["redis"].update({"held_streams": streams, "bytes_per_held_stream": held / max(streams, 1)})

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
            out[f"{parallel}x"] = {"cpu_us_per_token": statistics.median(cpu_per_token), "tokens_per_s": statistics.median(rates),
                                   "tokens": 20000 * parallel * self.args.reps}
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
            "errors": dict(Counter(s.error[:80] for s in streams if s.error)),  # why streams did not end: status, cut
        }

    async def held(self) -> None:
        """200 finished streams of 200 tokens, all still resumable (RESUME_TTL_SECONDS):
        with the redis store, what each holds in Redis."""
        n, count = 200, 200
        streams = []
        for wave in range(count // 50):
            streams += await asyncio.gather(*(self.through_gateway("n200-d0", n, f"held{wave}.{i}") for i in range(50)))
        self.results["held"] = {"streams": count, "done": sum(s.done for s in streams), "tokens": sum(s.tokens for s in streams)}

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
             + (f"; gateway slowed {results['slow']}x (one core, {results['slow'] - 1} busy loops)" if results.get("slow", 1) > 1 else "")]
    stores = results.get("stores")
    if stores:
        for store, figures in stores.items():
            lines.append(f"-- store {store}")
            lines += report({"machine": results["machine"], **figures}).splitlines()[1:]
            for name, scenario in figures.items():
                if isinstance(scenario, dict) and (r := scenario.get("redis")):
                    held = (f", {r['bytes_per_held_stream']:,.0f} B per held stream ({r['held_streams']} held)"
                            if "held_streams" in r else "")
                    lines.append(f"   redis in {name}: {r['commands_per_token']:.3f} commands/token, redis-server "
                                 f"{r['redis_server_cpu_us_per_token']:.1f} µs CPU/token{held}")
        if {"memory", "redis"} <= set(stores):
            for name in ("throughput", "fanout"):
                memory, redis = stores["memory"].get(name), stores["redis"].get(name)
                if memory and redis:
                    pairs = [(k, memory[k], redis[k]) for k in memory if isinstance(memory[k], dict) and "cpu_us_per_token" in memory[k]]
                    pairs += [(name, memory, redis)] if "cpu_us_per_token" in memory else []
                    for label, m, r in pairs:
                        lines.append(f"ratio redis/memory, {label} gateway CPU per token (same run): "
                                     f"{r['cpu_us_per_token'] / m['cpu_us_per_token']:.2f}x")
        return "\n".join(lines)
    if t := results.get("throughput"):
        for k, v in t.items():
            if k == "redis":
                continue
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
    stores = args.stores.split(",")
    with tempfile.TemporaryDirectory(prefix="asgi-stream-bench-") as workdir:
        procs = Processes(workdir, stores, args.slow, args.slow_core)
        try:
            benches = {store: Bench(procs, args, store) for store in stores}
            for bench in benches.values():
                await bench.warm_up()
            # fanout first: its RSS per stream needs a process that has not served a bigger load;
            # held next: Redis bytes per held stream counts every stream still held, so before throughput's long ones
            for name in sorted(args.scenarios, key=lambda s: (s != "fanout", s != "held")):
                for store, bench in benches.items():  # each scenario on each store in turn: same machine state
                    print(f"running {name} ({store} store) ...", file=sys.stderr, flush=True)
                    await bench.scenario(name)
            if stores == ["memory"]:
                return {"machine": machine(), "slow": args.slow, **benches["memory"].results}
            return {"machine": machine(), "slow": args.slow, "stores": {store: bench.results for store, bench in benches.items()}}
        finally:
            procs.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS), help=f"of {SCENARIOS + OPTIONAL}")
    parser.add_argument("--streams", type=int, default=1000, help="fanout concurrency (default 1000)")
    parser.add_argument("--reps", type=int, default=3, help="throughput repetitions (median)")
    parser.add_argument("--ttft-requests", type=int, default=200)
    parser.add_argument("--fanout-budget", type=float, default=30, help="seconds past nominal before fanout streams are cut")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--slow", type=int, default=1, metavar="N", help="run the gateway as on a machine N times slower")
    parser.add_argument("--slow-core", type=int, default=1, help="the core the slowed gateway is pinned to (default 1)")
    parser.add_argument("--stores", default="memory", help="memory, redis, or memory,redis (one gateway each, same run)")
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
