"""What is counted of every stream: the Prometheus metrics, the facts of a
finished stream (its ledger row and log line), and the one usage estimate
for a provider that sent no counts."""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping
from typing import Any

import orjson

from asgi_stream_core.record import StreamRecord
from providers import make_usage
from providers.pools import KeyPool


class Histogram:
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        self.counts[bisect_left(self.BUCKETS, value)] += 1  # the first bound >= value

    def samples(self, name: str) -> list[str]:
        bounds = [f"{b:g}" for b in self.BUCKETS] + ["+Inf"]
        cumulative = itertools.accumulate(self.counts)
        buckets = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(bounds, cumulative, strict=True)]
        return [*buckets, f"{name}_sum {self.sum:.6f}", f"{name}_count {sum(self.counts)}"]


class Metrics:
    def __init__(self) -> None:
        self.active = 0
        self.active_by_key: dict[str | None, int] = {}
        self.streams: Counter[tuple[str, str]] = Counter()  # (backend, finish reason)
        self.tokens: Counter[str] = Counter()  # by backend
        self.upstream_errors: Counter[str] = Counter()  # by error type
        self.rejected: Counter[str] = Counter()  # by error type
        self.attempts: Counter[tuple[str, str]] = Counter()  # an alias's attempts, by (upstream, outcome)
        self.time_to_first_token = Histogram()
        self.stream_duration = Histogram()

    def active_streams(self) -> int:
        """Streams admitted and not yet done (what the collector paces itself by)."""
        return self.active

    def count_finished(self, record: StreamRecord, duration: float) -> None:
        backend = record.request.backend
        self.streams[backend, record.finish_reason or "error"] += 1
        self.tokens[backend] += record.tokens
        if record.error is not None:
            self.upstream_errors[record.error.type] += 1
        if record.first_token_after is not None:
            self.time_to_first_token.observe(record.first_token_after)
        self.stream_duration.observe(duration)

    def render(self, held: int, key_pools: Mapping[str, KeyPool] | None = None) -> bytes:
        def family(name: str, kind: str, help: str, samples: list[str]) -> list[str]:
            return [f"# HELP asgi_stream_{name} {help}", f"# TYPE asgi_stream_{name} {kind}", *samples]

        def counter(name: str, help: str, labels: tuple[str, ...], values: Counter[Any]) -> list[str]:
            samples = []
            for key, value in sorted(values.items()):
                keys = key if isinstance(key, tuple) else (key,)
                pairs = ",".join(f'{label}="{v}"' for label, v in zip(labels, keys, strict=True))
                samples.append(f"asgi_stream_{name}{{{pairs}}} {value}")
            return family(name, "counter", help, samples)

        pools = sorted((key_pools or {}).items())
        pool_samples = [f'asgi_stream_keys_in_service{{upstream="{name}"}} {pool.in_service()}' for name, pool in pools]
        pool_help = "Keys of a CONFIG_FILE upstream's pool neither resting (429) nor refused (401, 403)."
        pool_lines = family("keys_in_service", "gauge", pool_help, pool_samples) if pools else []  # none: not listed
        lines = [
            *family("active_streams", "gauge", "Streams admitted and not yet done.", [f"asgi_stream_active_streams {self.active}"]),
            *family("held_streams", "gauge", "Streams held for resume (running or finished).", [f"asgi_stream_held_streams {held}"]),
            *counter("streams_total", "Finished streams.", ("backend", "finish_reason"), self.streams),
            *counter("tokens_total", "Token events sent.", ("backend",), self.tokens),
            *counter("upstream_errors_total", "Streams that ended in an error.", ("type",), self.upstream_errors),
            *counter("attempts_total", "Attempts of alias targets, by upstream and outcome (served, an HTTP status, "
                     "an error type, cancelled).", ("upstream", "outcome"), self.attempts),
            *counter("rejected_total", "Requests refused before a stream.", ("type",), self.rejected),
            *pool_lines,
            *family("time_to_first_token_seconds", "histogram", "From admission to the first token.",
                    self.time_to_first_token.samples("asgi_stream_time_to_first_token_seconds")),
            *family("duration_seconds", "histogram", "From admission to done.",
                    self.stream_duration.samples("asgi_stream_duration_seconds")),
        ]  # fmt: skip
        return ("\n".join(lines) + "\n").encode()


def stream_facts(record: StreamRecord, ended_clock: float) -> dict[str, Any]:
    """What the ledger row and the log line say about a finished stream."""
    usage = record.usage or {}
    ttft = record.first_token_after
    return {
        "stream_id": record.id,
        "key_name": record.key_name,
        "backend": record.request.backend,
        "model": record.request.model,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.started)),
        "time_to_first_token_ms": round(ttft * 1000, 3) if ttft is not None else None,
        "duration_ms": round((ended_clock - record.started_clock) * 1000, 3),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "total_tokens": usage.get("total_tokens", 0),
        "reasoning_tokens": usage.get("reasoning_tokens"),
        "estimated": int(bool(usage.get("estimated"))),
        "finish_reason": record.finish_reason,
        "error_type": record.error.type if record.error else None,
        "client_disconnected": int(record.ever_disconnected),
        "route": record.route,
        "served_upstream": record.served[0] if record.served else None,  # through an alias: which target served
        "served_model": record.served[1] if record.served else None,
        "attempts": record.attempts or None,  # through an alias: the targets tried; NULL for a plain backend
    }


def prompt_chars(request_messages: list[dict[str, Any]]) -> int:
    """The prompt's size in characters: its text, and any other content as JSON."""
    return sum(len(c) if isinstance(c := m.get("content"), str) else len(orjson.dumps(c)) for m in request_messages)


def estimated_usage(prompt_size: int, tokens: int) -> dict[str, Any]:
    """When the provider sent no counts: tokens as streamed, the prompt at ~4 characters a token."""
    return make_usage(-(-prompt_size // 4), tokens, estimated=True)
