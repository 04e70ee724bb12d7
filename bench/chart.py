"""One chart of the gateway's figures against the anchors (seed: FastAPI +
sse-starlette + openai SDK; relay: a raw httpx byte relay), from the shared
harness's JSON output (`run all --json`): one panel per figure (log scale),
lower is better in each. An optional earlier run of the same harness shows "before".

    python bench/chart.py AFTER.json [--before BEFORE.json] [-o bench/figures.png]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# (scenario, column key, panel title)
PANELS = [
    ("throughput", "cpu1", "throughput: CPU µs per token\n(1 stream, 20,000 tokens)"),
    ("fanout", "cpu", "fanout: CPU µs per token\n(1,000 streams x 200 tokens)"),
    ("fanout", "per", "fanout: RSS KiB per open stream"),
    ("ttft", "overp50", "first-token overhead over\ndirect upstream, p50 ms"),
    ("disconnect", "lat99", "disconnect to upstream\ncancel, p99 ms"),
]
COLORS = {"seed": "#b0b0b0", "relay": "#7a9cc6", "project (before)": "#e8b48a", "project": "#d9642b"}


def value(results: dict[str, Any], scenario: str, key: str, target: str) -> float:
    row = results["scenarios"].get(scenario, {}).get("rows", {}).get(target, {})
    raw = row.get(key)
    return float(raw) if isinstance(raw, (int, float)) else math.nan


def draw(after: dict[str, Any], before: dict[str, Any] | None, out: Path) -> None:
    bars = [("seed", after, "seed"), ("relay", after, "relay")]
    if before is not None:
        bars.append(("project (before)", before, "project"))
    bars.append(("project", after, "project"))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 4.2))
    for ax, (scenario, key, title) in zip(axes, PANELS, strict=True):
        heights = [value(results, scenario, key, target) for _, results, target in bars]
        names = [name for name, _, _ in bars]
        drawn = ax.bar(range(len(bars)), [0 if math.isnan(h) else h for h in heights], color=[COLORS[n] for n in names])
        for rect, height in zip(drawn, heights, strict=True):
            label = "n/a" if math.isnan(height) else f"{height:,.0f}" if height >= 100 else f"{height:.3g}"
            ax.annotate(label, (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(bars)), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_yscale("log")  # the seed is 10-100x the rest
        shown = [h for h in heights if h > 0 and not math.isnan(h)] or [1.0]
        ax.set_ylim(min(shown) / 3, max(shown) * 3)
    meta = after.get("meta", {})
    cores = meta.get("cpus", "?")
    note = "; 'before' is the same harness's run on the starting code" if before is not None else ""
    fig.suptitle(f"asgi-stream vs anchors, shared harness, one run ({cores} cores; log scale, lower is better{note})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("after", type=Path)
    parser.add_argument("--before", type=Path)
    parser.add_argument("-o", "--out", type=Path, default=Path(__file__).with_name("figures.png"))
    args = parser.parse_args()
    before = json.loads(args.before.read_text()) if args.before else None
    draw(json.loads(args.after.read_text()), before, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
