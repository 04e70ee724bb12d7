"""What bench/timeline/sitecustomize.py logged during a `held` run, probe by
probe: each probe stream's first token after the app was called, split into
the gateway's part before its upstream request, the upstream leg (httpx's
send to the response headers: the pool, the connect, the upstream's answer)
and the gateway's part after; with every collection over 1 ms, in any
process, and every loop lag over 3 ms in the gateway, that overlapped it.

    python bench/timeline/report.py /tmp/timeline
"""

from __future__ import annotations

import glob
import json
import statistics
import sys
from typing import Any

NEAR = 0.05  # s either side of a probe in which an event is shown beside it


def main(prefix: str) -> None:
    events = [json.loads(line) for name in sorted(glob.glob(prefix + ".*")) for line in open(name) if line.strip()]
    pauses = [e for e in events if e["kind"] in ("gc", "lag")]
    for pid in sorted({e["pid"] for e in events if e["kind"] == "request"}):
        requests = [e for e in events if e["pid"] == pid and e["kind"] == "request" and e["first"] is not None]
        upstream = [e for e in events if e["pid"] == pid and e["kind"] == "upstream"]
        held = [r for r in requests if r["end"] - r["t"] >= 1.0]
        if not held:
            continue
        start, end = min(r["t"] for r in held), max(r["end"] for r in held)
        probes = [r for r in requests if r["end"] - r["t"] < 1.0]
        print(f"gateway {pid}, {requests[0]['path']}: {len(held)} held streams")
        for label, chosen in (("idle", [r for r in probes if r["t"] < start][-20:]), ("held", [r for r in probes if start < r["t"] < end])):
            splits = [split(probe, upstream) for probe in chosen]
            medians = [statistics.median(column) for column in zip(*splits, strict=True)]
            total, before, leg, after = medians
            print(f"  {label}: median ms  first token {total:.2f} = before {before:.2f} + upstream {leg:.2f} + after {after:.2f}")
            if label == "held":
                for probe, (total, before, leg, after) in zip(chosen, splits, strict=True):
                    near = [f"{e['role']} {e['pid']} {e['kind']}{e.get('gen', '')} {e['ms']} ms at {1000 * (e['t'] - probe['t']):+.1f}"
                            for e in pauses if probe["t"] - NEAR < e["t"] < probe["end"] + NEAR]  # fmt: skip
                    print(f"    {total:6.2f} = {before:5.2f} + {leg:5.2f} + {after:5.2f}  {'; '.join(near)}")
    for role in sorted({e["role"] for e in pauses}):
        collections = sorted(e["ms"] for e in pauses if e["role"] == role and e["kind"] == "gc")
        print(f"{role}: {len(collections)} collections over 1 ms, the longest {collections[-5:]}")


def split(probe: dict[str, Any], upstream: list[dict[str, Any]]) -> tuple[float, float, float, float]:
    """(first token, before the upstream request, the upstream leg, after), in ms."""
    leg = next(u for u in upstream if probe["t"] <= u["t"] <= probe["end"])
    total = probe["first"] - probe["t"]
    before, during = leg["t"] - probe["t"], leg["headers"] - leg["t"]
    return 1000 * total, 1000 * before, 1000 * during, 1000 * (total - before - during)


if __name__ == "__main__":
    main(sys.argv[1])
