"""Issue 23, finding 7: three /v1 clients that never read, against an
upstream that floods 20,000 tokens of 4 KB, with max_tokens 1,024; the
gateway's RSS before, while they hold their connections, and after they
close, and how much the upstream sent. Run from the project root:

    python bench/flood_memory.py TREE     # TREE: a checkout to serve (this one: .)

Measured (2 cores, one run each): before 23418f5, RSS 44 -> 300 -> 141 MB and
the upstream sent 250.8 MB (every token of the three floods); after issue 23,
45 -> 62 -> 62 MB and 38.9 MB (each stream cut at max_tokens, a client that
does not read dropped past STREAM_BUFFER_BYTES)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.upstream import FakeUpstream, Reply

tree = str(Path(sys.argv[1]).resolve())


def tok(i):
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "x" * 4096}, "finish_reason": None}]}).encode() + b"\n\n"


flood = Reply(pieces=[tok(0)] * 20000 + [b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n', b"data: [DONE]\n\n"])


def rss(pid):
    return int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0]) // 1024


with FakeUpstream(lambda seen: flood) as up:
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": up.url + "/v1", "USAGE_DB": "", "PYTHONPATH": tree}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "asgi_stream:app", "--port", str(port), "--log-level", "warning"], cwd=tree, env=env
    )
    time.sleep(3)
    before = rss(proc.pid)
    body = json.dumps({"model": "openai/m", "messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 1024}).encode()
    socks = []
    for _ in range(3):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
            % (len(body), body)
        )
        socks.append(s)
    time.sleep(10)
    during = rss(proc.pid)
    read_by_upstream = up.bytes_sent
    for s in socks:
        s.close()
    time.sleep(5)
    after = rss(proc.pid)
    proc.terminate()
    proc.wait()
    sent = read_by_upstream / 1e6
    print(f"{tree}: RSS {before} -> {during} (3 clients not reading) -> {after} MB after they closed; upstream sent {sent:.1f} MB")
