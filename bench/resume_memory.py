"""What a held stream costs in memory: 1,000 finished StreamRecords of N short
tokens each, measured with tracemalloc. Run: python bench/resume_memory.py"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from asgi_stream_core.record import StreamRecord
from providers import ChatRequest

STREAMS = 1000


async def held_stream_cost(tokens: int) -> tuple[float, int]:
    request = ChatRequest([{"role": "user", "content": "hi"}], "echo", "echo", 8192)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    records = []
    for i in range(STREAMS):
        record = StreamRecord(f"{i:022d}", None, request, 1 << 20)
        for t in range(tokens):
            record.append("token", f" tok{t}")
        record.finish("stop", {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}, None)
        records.append(record)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return grown / STREAMS, len(records[0].read(0) or b"")


async def main() -> None:
    for tokens in (0, 200, 1000):
        per_stream, frame_bytes = await held_stream_cost(tokens)
        print(f"{tokens:>5} tokens: {per_stream / 1024:6.1f} KiB per held stream ({frame_bytes} bytes of encoded events)")


if __name__ == "__main__":
    anyio.run(main)
