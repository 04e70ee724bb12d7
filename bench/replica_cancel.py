"""Cross-replica cancel latency: two uvicorn replicas on one redis-server, a
stream started on one, `DELETE /chat/stream/<id>` sent to the other, timed from
sending the DELETE to the fake upstream seeing its connection closed. The same
DELETE sent to the owner itself is timed in the same run, alternating, as the
baseline.

    python bench/replica_cancel.py --tries 50 --json bench/results/replica-cancel.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.redis_server import RedisServer  # noqa: E402 - after the path
from tests.replicas import cancel_across, gateway_env, respond, run_replicas  # noqa: E402
from tests.upstream import FakeUpstream  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tries", type=int, default=50)
    parser.add_argument("--json", help="write the latencies here")
    args = parser.parse_args(argv)
    across: list[float] = []
    same: list[float] = []
    with tempfile.TemporaryDirectory(prefix="replica-cancel-") as workdir, FakeUpstream(respond) as upstream:
        redis = RedisServer(Path(workdir))
        redis.start()
        try:
            with run_replicas(["uvicorn", "uvicorn"], gateway_env(upstream, redis.url), Path(workdir)) as (a, b):
                for i in range(args.tries):
                    owner, other = (a, b) if i % 2 == 0 else (b, a)
                    across.append(cancel_across(owner, other, upstream, f"forever across{i}") * 1000)
                    same.append(cancel_across(owner, owner, upstream, f"forever same{i}") * 1000)
        finally:
            redis.stop()
    figures = {
        "tries": args.tries,
        "across_p50_ms": percentile(across, 50), "across_p99_ms": percentile(across, 99), "across_max_ms": max(across),
        "same_p50_ms": percentile(same, 50), "same_p99_ms": percentile(same, 99), "same_max_ms": max(same),
        "across_mean_ms": statistics.fmean(across), "same_mean_ms": statistics.fmean(same),
    }  # fmt: skip
    print(f"DELETE on the other replica -> upstream closed: p50 {figures['across_p50_ms']:.1f} ms, "
          f"p99 {figures['across_p99_ms']:.1f} ms, max {figures['across_max_ms']:.1f} ms ({args.tries} tries)")
    print(f"DELETE on the owner (same run, baseline):     p50 {figures['same_p50_ms']:.1f} ms, "
          f"p99 {figures['same_p99_ms']:.1f} ms, max {figures['same_max_ms']:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({**figures, "across_ms": across, "same_ms": same}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
