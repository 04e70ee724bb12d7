"""What holding a silent stream costs per second, and why that cost grows with
the number of streams held (issue 25). N streams are held in-process (no ASGI
server, so only the app's own share) against the shared harness's fake
upstream and its held model: token 0, then `: keep-alive` every K ms for H
ms, then 5 tokens. They are opened at --ramp a second; once all have their
first token (and --settle s more), one window of whole keep-alive and
heartbeat periods is measured (15 s by default: three keep-alives and one
heartbeat per stream):

- CPU µs per stream·s: this process's CPU (time.process_time) over the
  window, per stream held and second (the in-process client costs next to
  nothing: a comparison per body);
- the heartbeats sent in the window, per stream;
- the cyclic GC in the window: collections per generation, their CPU, and
  the objects they examined (the generations collected, counted at each
  start): a count that the machine's load does not change, unlike seconds;
  and the CPU per object examined, which cache misses raise;
- with --profile, cProfile's call count per stream·s (the same at any N
  when nothing is O(N) per event: a sweep, a scan over all streams), and the
  functions with the most calls and the most own time (a collection's time
  is counted to the function whose allocation started it);
- with --types, the GC-tracked objects each held stream adds, by type: what
  every full collection traverses;
- under --loop asyncio, the timer heap (loop._scheduled) and its cancelled
  handles at the window's start and end;
- with --callgrind, the window's instructions (one size, run by hand under
  valgrind; it keeps up with the keep-alives up to ~500 streams, past that it
  lags and reads coalesce):

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=cg.out \
        python bench/held_cost.py --one 500 --ramp 100 --hold 150000 --callgrind
    callgrind_annotate --inclusive=yes cg.out.1 | grep -E 'TOTALS|gc_collect_main'

Each size runs in a process of its own, sizes alternate, --repeat times:

    python bench/held_cost.py --streams 1000 5000 --repeat 2
    python bench/held_cost.py --streams 1000 5000 --hold 66000 --window 45 --verbose
    python bench/held_cost.py --streams 1000 5000 --profile --top 25
    python bench/held_cost.py --streams 5000 --gc-off              # the window without the cyclic GC
    python bench/held_cost.py --streams 5000 --gc-threshold 10000,10,10
    python bench/held_cost.py --relay /work/shared/bench/apps/relay_app.py

Needs the shared harness's fake upstream (--upstream, default
/work/shared/bench/fake_upstream.py) and, for N = 5,000, an open-file limit
of some 10,300 (two sockets per stream, both ends on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import gc
import json
import os
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from run import free_port, wait_for_port  # noqa: E402
from stream_memory import load_app, run_stream, start_lifespan  # noqa: E402


class GCClock:
    """Collections per generation, the CPU seconds spent in each, and the objects each
    examined (the generations it collected, counted at its start); the counting's own
    CPU is kept apart (`overhead`)."""

    def __init__(self, census: bool = False) -> None:
        self.census = census  # at each start: the types of what is collected, and its largest containers
        self.found: list[dict[str, Any]] = []
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.examined = [0, 0, 0]
        self.overhead = 0.0
        self._t = 0.0
        self.each: list[tuple[int, float, int]] = []  # (generation, ms, objects examined)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        generation = info["generation"]
        if phase == "start":
            t = time.process_time()
            examined = sum(len(gc.get_objects(g)) for g in range(generation + 1))
            self.examined[generation] += examined
            self.each.append((generation, 0.0, examined))
            if self.census:
                self.take_census(generation)
            self._t = time.process_time()
            self.overhead += self._t - t
        else:
            took = time.process_time() - self._t
            self.count[generation] += 1
            self.seconds[generation] += took
            self.each[-1] = (generation, round(took * 1000, 2), self.each[-1][2])

    def take_census(self, generation: int) -> None:
        objects = [o for g in range(generation + 1) for o in gc.get_objects(g)]
        sizes = sorted(((len(gc.get_referents(o)), type(o).__qualname__) for o in objects), reverse=True)
        types = collections.Counter(type(o).__qualname__ for o in objects)
        self.found.append({"generation": generation, "objects": len(objects), "largest": sizes[:4], "types": types.most_common(12)})

    def summary(self, n: int, wall: float) -> dict[str, Any]:
        return {
            "gc_collections": self.count,
            "gc_ms": [round(s * 1000, 1) for s in self.seconds],
            "gc_us_per_stream_s": round(sum(self.seconds) / n / wall * 1e6, 2),
            "gc_examined_per_stream_s": [round(e / n / wall, 2) for e in self.examined],
            "gc_ns_per_object": round(sum(self.seconds) / max(1, sum(self.examined)) * 1e9, 1),
            "gc_each": self.each,
            "gc_census": self.found,
        }


def timer_heap() -> dict[str, int] | None:
    """asyncio's timer heap: its handles, and how many of them are cancelled (None on uvloop)."""
    scheduled = getattr(asyncio.get_running_loop(), "_scheduled", None)
    if scheduled is None:
        return None
    return {"handles": len(scheduled), "cancelled": sum(1 for h in scheduled if h.cancelled())}


def profile_summary(profile: cProfile.Profile, n: int, wall: float, top: int) -> dict[str, Any]:
    stats: Any = pstats.Stats(profile)
    rows = [(v[1], v[2], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in stats.stats.items()]
    return {
        "calls_per_stream_s": round(sum(r[0] for r in rows) / n / wall, 1),
        "top_calls": [(round(c / n / wall, 3), name) for c, _, name in sorted(rows, reverse=True)[:top]],
        "top_tottime_us": [(round(t / n / wall * 1e6, 3), name) for _, t, name in sorted(rows, key=lambda r: -r[1])[:top]],
    }


async def hold(args: argparse.Namespace, app: Any, body: bytes) -> dict[str, Any]:
    n = args.one
    first = [False] * n
    beats = [0]

    def sender(i: int) -> Any:
        async def send(message: dict[str, Any]) -> None:
            chunk = message.get("body", b"")
            if not first[i] and b"tok0" in chunk:
                first[i] = True
            elif chunk in (b":\n", b": keep-alive\n\n"):  # ours, or a relay's pass-through of the upstream's
                beats[0] += 1

        return send

    if args.gc_threshold:
        gc.set_threshold(*map(int, args.gc_threshold.split(",")))
    gone = anyio.Event()
    result: dict[str, Any] = {"streams": n}
    async with anyio.create_task_group() as server:
        start_lifespan(app, server)
        await anyio.sleep(0.5)
        idle_types = collections.Counter(type(o).__qualname__ for o in gc.get_objects()) if args.types else None
        async with anyio.create_task_group() as streams:
            t0 = anyio.current_time()
            for i in range(n):
                await anyio.sleep_until(t0 + i / args.ramp)
                streams.start_soon(run_stream, app, body, gone, sender(i))
            while not all(first):
                await anyio.sleep(0.1)
            result["held_after_s"] = round(anyio.current_time() - t0, 2)
            await anyio.sleep(args.settle)
            left = args.hold / 1000 - (anyio.current_time() - t0) - 1.0  # the first streams end their think at t0 + hold
            if left < args.window:
                raise SystemExit(f"the window ({args.window} s) does not fit in the hold: {left:.1f} s left; raise --hold")
            if idle_types is not None:  # what each held stream adds to what every full collection traverses
                held_types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
                held_types.subtract(idle_types)
                result["tracked_per_stream"] = round(held_types.total() / n, 1)
                result["types_per_stream"] = [(t, round(c / n, 2)) for t, c in held_types.most_common(args.top)]
            if args.gc_off:
                gc.disable()
            clock = GCClock(args.gc_census)
            gc.callbacks.append(clock)
            result["gc_tracked"] = len(gc.get_objects())
            result["timers_start"] = timer_heap()
            beats[0] = 0
            if args.callgrind:  # run under valgrind --tool=callgrind --instr-atstart=no: count the window only
                await anyio.run_process(["callgrind_control", "--instr=on", str(os.getpid())])
            profile = cProfile.Profile() if args.profile else None
            w0, c0 = time.perf_counter(), time.process_time()
            if profile:
                profile.enable()
            await anyio.sleep(args.window)
            if profile:
                profile.disable()
            if args.callgrind:
                await anyio.run_process(["callgrind_control", "--dump", str(os.getpid())])
                await anyio.run_process(["callgrind_control", "--instr=off", str(os.getpid())])
            gc.callbacks.remove(clock)
            cpu, wall = time.process_time() - c0 - clock.overhead, time.perf_counter() - w0
            result["gc_tracked_end"] = len(gc.get_objects())  # more than at the start: something piles up
            gc.enable()
            result.update(window_s=round(wall, 2), cpu_s=round(cpu, 3), us_per_stream_s=round(cpu / n / wall * 1e6, 2),
                          heartbeats_per_stream=round(beats[0] / n, 3), timers_end=timer_heap(), load=os.getloadavg()[0],
                          **clock.summary(n, wall))  # fmt: skip
            if profile:
                if args.profile_out:
                    profile.dump_stats(f"{args.profile_out}.{n}")
                result.update(profile_summary(profile, n, wall, args.top))
            gone.set()
        server.cancel_scope.cancel()
    return result


def run_one(args: argparse.Namespace) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    upstream = subprocess.Popen([sys.executable, args.upstream, "--port", str(port)], stdout=subprocess.DEVNULL)
    os.environ.update({"OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1", "OPENAI_API_KEY": "bench", "USAGE_DB": "",
                       "LOG_LEVEL": "warning", "MAX_STREAMS": "1000000", "MAX_STREAMS_PER_KEY": "1000000",
                       "MAX_TOKENS_LIMIT": "1000000", "RESUME_GRACE_SECONDS": "0"})  # fmt: skip
    try:
        wait_for_port(port)
        app, body = load_app(args.relay, f"bench-n6-d0-h{args.hold}-k{args.keepalive}")
        result = anyio.run(hold, args, app, body, backend_options={"use_uvloop": args.loop == "uvloop"})
    finally:
        upstream.terminate()
        upstream.wait(30)
    print(json.dumps(result))


def report(n: int, r: dict[str, Any], verbose: bool) -> None:
    n_gc, ms = "/".join(map(str, r["gc_collections"])), "/".join(map(str, r["gc_ms"]))
    examined = "/".join(map(str, r["gc_examined_per_stream_s"]))
    print(f"{n:>7} {r['held_after_s']:>6} {r['window_s']:>8} {r['us_per_stream_s']:>15} {r['heartbeats_per_stream']:>12} "
          f"{r['gc_us_per_stream_s']:>14} {n_gc:>11} {ms:>22} {examined:>24} {r['gc_ns_per_object']:>9} "
          f"{r.get('calls_per_stream_s', '-'):>14} {r['load']:>5.2f}")  # fmt: skip
    if r["timers_start"] is not None:
        print(f"        asyncio timer heap, start: {r['timers_start']}, end: {r['timers_end']}")
    if verbose:
        print(f"        {r['gc_tracked']} -> {r['gc_tracked_end']} objects tracked; each collection (generation, ms, examined):")
        print(f"        {r['gc_each']}")
    if "types_per_stream" in r:
        print(f"        tracked objects per held stream: {r['tracked_per_stream']}: {r['types_per_stream']}")
    for found in r["gc_census"]:
        print(f"        census {found}")
    for key in ("top_calls", "top_tottime_us"):
        for value, name in r.get(key, []):
            print(f"        {key} {value:>10} {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--hold", type=int, default=40_000, help="ms of think per stream")
    parser.add_argument("--keepalive", type=int, default=5000, help="ms between the upstream's keep-alive comments")
    parser.add_argument("--window", type=float, default=15.0, help="s; whole keep-alive and heartbeat (15 s) periods")
    parser.add_argument("--settle", type=float, default=1.0, help="s from the last stream held to the window")
    parser.add_argument("--ramp", type=float, default=1000.0, help="streams opened per second")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--gc-off", action="store_true", help="no cyclic GC in the window: the cost without it")
    parser.add_argument("--gc-threshold", help="gc.set_threshold(A, B, C) before the first stream, as A,B,C")
    parser.add_argument("--gc-census", action="store_true", help="at each collection: the types collected, the largest containers")
    parser.add_argument("--types", action="store_true", help="the GC-tracked objects each held stream adds, by type")
    parser.add_argument("--profile", action="store_true", help="cProfile over the window (slows it: compare calls, not µs)")
    parser.add_argument("--profile-out", help="also write the profile to PATH.<streams> (pstats)")
    parser.add_argument("--callgrind", action="store_true", help="count the window's instructions (see above: --one N under valgrind)")
    parser.add_argument("--verbose", action="store_true", help="every collection in the window")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--upstream", default="/work/shared/bench/fake_upstream.py", help="the shared harness's fake upstream")
    parser.add_argument("--relay", help="measure this relay app file (the shared harness's) instead of the gateway")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one size
    args = parser.parse_args()
    if args.one:
        return run_one(args)
    forward = sys.argv[1:]
    if "--streams" in forward:
        at = forward.index("--streams")
        del forward[at : at + 1 + len(args.streams)]
    print(f"{'streams':>7} {'held s':>6} {'window s':>8} {'CPU µs/stream·s':>15} {'beats/stream':>12} {'gc µs/stream·s':>14} "
          f"{'gc n0/n1/n2':>11} {'gc ms 0/1/2':>22} {'examined/stream·s 0/1/2':>24} {'gc ns/obj':>9} "
          f"{'calls/stream·s':>14} {'load':>5}")  # fmt: skip
    for _ in range(args.repeat):
        for n in args.streams:
            out = subprocess.run([sys.executable, __file__, *forward, "--one", str(n)], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:])
                continue
            report(n, json.loads(out.stdout.strip().splitlines()[-1]), args.verbose)


if __name__ == "__main__":
    main()
