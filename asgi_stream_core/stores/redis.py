"""Where stream records live when `REDIS_URL` is set: every replica is one
service. The process that admits a stream owns it and serves its own readers
from memory; a write-behind task copies its events to a Redis stream for the
others, which serve resumes from a local copy fed by one follower task."""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import anyio
import coredis
import coredis.exceptions
import orjson

from asgi_stream_core.config import Config
from asgi_stream_core.ledger import UsageLedger
from asgi_stream_core.metrics import estimated_usage, prompt_chars, stream_facts
from asgi_stream_core.record import StreamRecord
from asgi_stream_core.stores.memory import StreamRegistry
from asgi_stream_core.types import RETRY_SOON, Refusal, store_unavailable
from providers import ChatRequest, UpstreamError

FLUSH_SECONDS = 0.005  # write-behind: how long appends wait to share one pipeline
PREFIX = "asgi-stream:"
SLOTS = PREFIX + "slots"  # sorted set: stream id -> slot lease expiry (ms, Redis clock)
log = logging.getLogger("asgi_stream")
ORPHANS = PREFIX + "orphans"  # streams whose slot lease expired unfinished: their owner died
LEASE_LOST = "this stream's slot lease lapsed (its process stalled, or Redis was away) and another stream or replica took it over"

# Check-and-take a stream slot, atomically for every replica, and describe
# the stream (KEYS[4], ARGV[6] ms to live, then field/value pairs; none for a
# stream that is not resumable). Expired leases are dropped first (and their
# streams handed to whoever ends orphans).
ADMIT = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
for _, stream in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do redis.call('SADD', KEYS[3], stream) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 1 end
if ARGV[5] == '1' and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 2 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if ARGV[5] == '1' then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) * 2)
end
if #ARGV > 6 then
  redis.call('HSET', KEYS[4], unpack(ARGV, 7))
  redis.call('PEXPIRE', KEYS[4], ARGV[6])
end
return 0
"""
# Renew the slot leases of a process's running streams (ARGV: lease ms, the
# two limits and whether the key's counts, then triples of stream id, its
# per-key set and its ended-by key). A lease that lapsed meanwhile (a starved
# loop, Redis away) may have been found by a replica that then ended its
# stream, or had its slot given to a new stream: it is taken back only if
# neither happened and it fits the limits again. Returns the streams another
# replica ended, those that lost their slot, those taken back, then up to 10
# orphans to end.
RENEW = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local lease = tonumber(ARGV[1])
local live = '(' .. now
local ended, lost, retaken = {}, {}, {}
for i = 5, #ARGV, 3 do
  local stream, per_key, ended_by = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local held = redis.call('ZSCORE', KEYS[1], stream)
  if not held then  -- an orphan, or one Redis forgot (restarted empty)
    redis.call('SREM', KEYS[2], stream)
    if redis.call('EXISTS', ended_by) == 1 then
      ended[#ended + 1] = stream
    else
      held = redis.call('ZCOUNT', KEYS[1], live, '+inf') < tonumber(ARGV[2])
      if held and ARGV[4] == '1' and per_key ~= '' then
        held = redis.call('ZCOUNT', per_key, live, '+inf') < tonumber(ARGV[3])
      end
      if held then retaken[#retaken + 1] = stream else lost[#lost + 1] = stream end
    end
  end
  if held then
    redis.call('ZADD', KEYS[1], now + lease, stream)
    if per_key ~= '' then
      redis.call('ZADD', per_key, now + lease, stream)
      redis.call('PEXPIRE', per_key, lease * 2)
    end
  end
end
for _, stream in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do redis.call('SADD', KEYS[2], stream) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return {ended, lost, retaken, redis.call('SPOP', KEYS[2], 10)}
"""


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:[redacted]@{netloc}"))


def events_key(stream_id: str) -> str:
    return f"{PREFIX}{stream_id}:events"


def meta_key(stream_id: str) -> str:
    return f"{PREFIX}{stream_id}:meta"


def ended_by_key(stream_id: str) -> str:
    return f"{PREFIX}{stream_id}:ended-by"


def of_key(meta: dict[bytes, bytes], key_name: str | None) -> bool:
    """Whether the stream this meta describes belongs to that API key. A meta
    without `key` lost what admission wrote (Redis restarted empty, or evicted
    it; later flushes write only count, first, tokens): it belongs to nobody."""
    return meta.get(b"key") == ("" if key_name is None else "=" + key_name).encode()


def key_slots(key_name: str | None) -> str:
    return f"{PREFIX}slots:key:{key_name}" if key_name is not None else ""


def as_bytes(value: str | bytes) -> bytes:
    """coredis types stream ids and values as str or bytes; without decoding they are bytes."""
    return value.encode() if isinstance(value, str) else value


def pack(events: list[tuple[str, str]]) -> bytes:
    """One Redis stream entry's value: the events of one flush, framed data as is."""
    return orjson.dumps(events)


def unpack(entry_id: bytes, value: bytes) -> tuple[int, list[tuple[str, str]]]:
    """(position of the entry's first event, its events); the entry id is its last event's position."""
    events = orjson.loads(value)
    return int(entry_id.split(b"-")[0]) - len(events) + 1, events


class Owned:
    """What the write-behind knows of a stream this process owns."""

    __slots__ = ("first", "flushed", "readers", "remote")

    def __init__(self) -> None:
        self.flushed = 0  # events up to this position are in Redis
        self.first = 0  # the owner dropped events up to here; Redis too
        self.remote: dict[str, tuple[int, float]] = {}  # process -> (its readers of this stream, until)
        self.readers = 0  # its readers on every replica, as its meta last said


class RedisStore:
    """The store shared by every replica through Redis (see docs/scaling.md)."""

    name = "redis"

    def __init__(self, config: Config, registry: StreamRegistry, ledger: UsageLedger | None):
        self.config, self.registry, self.ledger = config, registry, ledger
        self.url = config.redis_url
        self.lease_ms = max(100, int(config.owner_lease * 1000))
        self.ttl = max(1, math.ceil(config.resume_ttl))
        self.process = secrets.token_hex(6)
        self.channel = f"{PREFIX}process:{self.process}"
        self.wake_key = f"{PREFIX}wake:{self.process}"
        self.ok = False
        self.client: coredis.Redis[bytes] | None = None
        self.owned: dict[str, tuple[StreamRecord, Owned]] = {}
        self.dirty: set[str] = set()
        self.flush_due = anyio.Event()
        self.followed: dict[StreamRecord, int] = {}  # local copy -> the last entry id (a position) it was fed
        self.tasks: anyio.abc.TaskGroup | None = None
        self.flushing = False
        self.flushes = 0  # write-behind pipelines sent (bench/redis_costs.py counts them per token)
        self.renewed = 0.0  # when a renewal round last succeeded (anyio clock)
        self._owner_channel: dict[str, str] = {}  # stream id -> its owner's channel, for copies followed here
        self.copies: dict[str, int] = {}  # stream id -> copies of it read here (one a resume) until their reader leaves

    # --- lifetime

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        client = coredis.Redis.from_url(self.url, connect_timeout=2, stream_timeout=10,
                                        retry_policy=coredis.retry.NoRetryPolicy())  # fmt: skip
        unreachable: BaseException | None = None
        try:
            async with client:
                try:
                    await client.ping()
                except (coredis.exceptions.RedisError, OSError) as exc:
                    unreachable = exc  # raised below: here coredis's task group would wrap it
                else:
                    self.client, self.ok, self.renewed = client, True, anyio.current_time()
                    async with anyio.create_task_group() as tasks:
                        self.tasks = tasks
                        tasks.start_soon(self._write_behind)
                        tasks.start_soon(self._follow)
                        tasks.start_soon(self._listen)
                        tasks.start_soon(self._renew)
                        try:
                            yield
                        finally:
                            with anyio.move_on_after(3, shield=True):  # the streams' last events reach Redis
                                while (self.dirty or self.flushing) and self.ok:  # bounded, at shutdown
                                    self.flush_due.set()
                                    await anyio.sleep(0.01)
                            tasks.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # coredis's own task group wraps a lost connection at exit
            if not group.subgroup((coredis.exceptions.RedisError, OSError)):
                raise
        finally:
            self.client, self.ok = None, False
        if unreachable is not None:
            raise store_unavailable(f"REDIS_URL={redacted(self.url)} is unreachable: {self._say(unreachable)}")

    def _say(self, exc: BaseException) -> str:
        """An error's text, never with the password in it."""
        text = (str(exc) or type(exc).__name__).replace(self.url, redacted(self.url))
        password = urlsplit(self.url).password
        return text.replace(password, "[redacted]") if password else text

    def health(self) -> dict[str, Any]:
        return {"store": "redis", "store_ok": self.ok}

    def _client(self) -> coredis.Redis[bytes]:
        if self.client is None or not self.ok:
            raise store_unavailable()
        return self.client

    # --- the owner: admission, write-behind, leases

    async def hold(self, record: StreamRecord) -> None:
        client, cfg = self._client(), self.config
        meta = {**self._description(record), "count": 0, "first": 0, "tokens": 0}
        keys = [SLOTS, key_slots(record.key_name) or SLOTS, ORPHANS, meta_key(record.id)]
        args = [record.id, self.lease_ms, *self._limits(), self.lease_ms * 3 + self.ttl * 1000,
                *[item for pair in meta.items() for item in pair]]  # fmt: skip
        try:  # one command, not a pipeline: commands share this process's connection, pipelines each take one
            refused = await client.eval(ADMIT, keys, args)
            if refused and any(held.finished for held, _ in self.owned.values()):
                # a slot here is free from done on, as without Redis: write the pending releases, then ask again
                with anyio.move_on_after(1):
                    while any(held.finished for held, _ in self.owned.values()):  # the write-behind empties it
                        self.flush_due.set()
                        await anyio.sleep(0.002)
                refused = await client.eval(ADMIT, keys, args)
        except (coredis.exceptions.RedisError, OSError) as exc:
            self._lost(exc)
            raise store_unavailable() from None
        if refused == 1:
            raise Refusal(503, "overloaded", f"the service is at its limit of {cfg.max_streams} streams", RETRY_SOON)
        if refused == 2:
            raise Refusal(429, "rate_limited", f"this key is at its limit of {cfg.max_streams_per_key} streams", RETRY_SOON)
        self.owned[record.id] = (record, Owned())  # its slot lease is renewed and released like any other
        record.on_append = self._appended
        if record.resumable:
            self.registry.add(record)

    def _description(self, record: StreamRecord) -> dict[str, str | int]:
        """What a stream's meta says besides its progress: for other replicas and
        for its row, should its owner die."""
        description: dict[str, str | int] = {
            "key": "" if record.key_name is None else "=" + record.key_name, "owner": self.process,
            "backend": record.request.backend, "model": record.request.model, "started": repr(record.started),
            "prompt_chars": prompt_chars(record.request.messages), "route": record.route,
        }  # fmt: skip
        if not record.resumable:  # no replica may find, follow or cancel it: its meta is only for its row, should its owner die
            description["resumable"] = 0
        return description

    def _limits(self) -> list[int | str]:
        """The limits' arguments to ADMIT and RENEW; a key's own limit counts only with API_KEYS."""
        return [self.config.max_streams, self.config.max_streams_per_key, "1" if self.config.api_keys else "0"]

    def _appended(self, record: StreamRecord) -> None:
        self.dirty.add(record.id)
        self.flush_due.set()

    def finished(self, record: StreamRecord) -> None:
        if record.id in self.owned:
            self._appended(record)

    def _lost(self, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError):  # slow (Redis or this loop), not gone: that request is refused
            return
        if self.ok:
            log.warning("the stream store lost Redis (%s): new streams get 503 store_unavailable until it answers", self._say(exc))
        self.ok = False

    async def _write_behind(self) -> None:
        """Every pending append of every owned stream, in one pipeline per flush."""
        while True:
            await self.flush_due.wait()
            await anyio.sleep(FLUSH_SECONDS if self.ok else 0.5)
            self.flush_due = anyio.Event()
            dirty, self.dirty, self.flushing = self.dirty, set(), True
            try:
                await self._flush(dirty)
            except (coredis.exceptions.RedisError, OSError) as exc:
                self.dirty |= dirty
                self._lost(exc)
                self.flush_due.set()
                await self._reconnect()
            finally:
                self.flushing = False

    async def _flush(self, dirty: set[str]) -> None:
        client = self.client
        assert client is not None
        if anyio.current_time() - self.renewed > self.lease_ms / 1000:  # our leases may have lapsed (a stall, Redis away):
            await self.renew_leases(client)  # learn which streams a replica ended before writing past their ending
        done: list[tuple[StreamRecord, Owned, int, Any]] = []
        self.flushes += 1
        async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
            for stream_id in dirty:
                record, owned = self.owned.get(stream_id, (None, None))
                if record is None or owned is None:
                    continue
                if not record.resumable:  # no events in Redis: only its token count, for an interrupted row
                    pipe.hset(meta_key(stream_id), {"tokens": record.tokens, **({"finished": "1"} if record.finished else {})})
                    if record.finished:
                        self._release_slot(pipe, record)
                        pipe.pexpire(meta_key(stream_id), self.ttl * 1000)
                        done.append((record, owned, record.count, None))
                    continue
                events = record.events(owned.flushed)
                if events is None:  # dropped before it was written: Redis drops it too
                    events = record.events(record.first) or []
                if record.first > owned.first:
                    pipe.xtrim(events_key(stream_id), coredis.PureToken.MINID, record.first + 1)
                added = pipe.xadd(events_key(stream_id), {"e": pack(events)}, identifier=f"{record.count}-0") if events else None
                pipe.hset(meta_key(stream_id), {"count": record.count, "first": record.first, "tokens": record.tokens,
                                                **({"finished": record.finish_reason or "error"} if record.finished else {})})
                done.append((record, owned, record.count, added))
                if record.finished:
                    expiry = self.ttl * 1000
                    self._release_slot(pipe, record)
                elif owned.flushed == 0:  # the first write makes the key; the renewal refreshes its expiry
                    expiry = self.lease_ms * 3 + self.ttl * 1000
                else:
                    continue
                pipe.pexpire(events_key(stream_id), expiry)
                pipe.pexpire(meta_key(stream_id), expiry)
        self.ok = True
        for record, owned, count, added in done:
            try:
                if added is not None:
                    await added
            except coredis.exceptions.ResponseError:  # the id is not above the top: a replica ended the stream
                self._end_lapsed(record.id, ended_elsewhere=True)
                continue
            owned.flushed, owned.first = count, record.first
            if record.finished and count == record.count:
                del self.owned[record.id]

    def _release_slot(self, pipe: Any, record: StreamRecord) -> None:
        pipe.zrem(SLOTS, [record.id])
        if record.key_name is not None:
            pipe.zrem(key_slots(record.key_name), [record.id])

    async def _reconnect(self) -> None:
        """Until Redis answers again."""
        while not self.ok:
            try:
                assert self.client is not None
                with anyio.fail_after(3):
                    await self.client.ping()
                self.ok = True
            except (coredis.exceptions.RedisError, OSError, TimeoutError):
                await anyio.sleep(0.5)

    async def _renew(self) -> None:
        """One task per process: a round of renewals every third of a lease."""
        while True:
            await anyio.sleep(self.lease_ms / 3000 if self.ok else 0.5)
            if self.client is not None:
                await self.renew_leases(self.client)

    async def renew_leases(self, client: coredis.Redis[bytes]) -> None:
        """Renew the slot leases and key expiries of every owned stream in one
        round trip, end those that lost their slot, and the streams of dead owners."""
        held: list[str] = []  # triples for RENEW
        kept: list[str] = []  # the keys of their meta, and of their events if resumable
        readers: list[tuple[str, int]] = []  # what every replica's resume checks against MAX_READERS_PER_STREAM
        for stream_id, (record, owned) in self.owned.items():
            if not record.finished:
                held += [stream_id, key_slots(record.key_name), ended_by_key(stream_id)]
                kept += [meta_key(stream_id), events_key(stream_id)] if record.resumable else [meta_key(stream_id)]
                if record.resumable and self.readers(record) != owned.readers:
                    owned.readers = self.readers(record)
                    readers.append((stream_id, owned.readers))
        try:
            async with client.pipeline(transaction=False) as pipe:
                renewed = pipe.eval(RENEW, [SLOTS, ORPHANS], [self.lease_ms, *self._limits(), *held])
                for key in kept:
                    pipe.pexpire(key, self.lease_ms * 3 + self.ttl * 1000)
                for stream_id, count in readers:
                    pipe.hset(meta_key(stream_id), {"readers": count})
                self._announce_readers(pipe)
            self.ok = True  # this round doubles as the health check: service resumes by itself when Redis is back
            ended, lost, retaken, orphans = cast("list[list[bytes]]", await renewed)
            self.renewed = anyio.current_time()
            for ended_id in ended:
                self._end_lapsed(ended_id.decode(), ended_elsewhere=True)
            for lost_id in lost:
                self._end_lapsed(lost_id.decode(), ended_elsewhere=False)
            if retaken:
                await self._describe_again(client, [stream_id.decode() for stream_id in retaken])
            for orphan in orphans:
                await self._interrupt(orphan.decode())
        except (coredis.exceptions.RedisError, OSError) as exc:
            self._lost(exc)
            return
        now = anyio.current_time()
        for record, owned in self.owned.values():  # remote readers that stopped saying so are gone
            if any(until < now for _, until in owned.remote.values()):
                owned.remote = {p: v for p, v in owned.remote.items() if v[1] >= now}
                record.readers_changed()

    async def _describe_again(self, client: coredis.Redis[bytes], stream_ids: list[str]) -> None:
        """Streams whose slots were taken back may have lost their meta with it
        (Redis restarted empty): write it again, so other replicas can resume
        and cancel them from the positions Redis holds."""
        async with client.pipeline(transaction=False) as pipe:
            for stream_id in stream_ids:
                record, owned = self.owned.get(stream_id, (None, None))
                if record is not None and owned is not None:
                    progress = {"count": owned.flushed, "first": owned.first, "tokens": record.tokens}
                    pipe.hset(meta_key(stream_id), {**self._description(record), **progress})
                    pipe.pexpire(meta_key(stream_id), self.lease_ms * 3 + self.ttl * 1000)

    def _end_lapsed(self, stream_id: str, *, ended_elsewhere: bool) -> None:
        """A stream of ours whose lease lapsed and that may not run on: it ends
        here with `interrupted`, as a replica that found it orphaned tells its
        readers. If a replica did end it, Redis holds that ending and we write
        nothing more; else (its slot went to a new stream) ours goes to Redis."""
        owned = self.owned.pop(stream_id, None) if ended_elsewhere else self.owned.get(stream_id)
        if owned is not None and owned[0].cancel(UpstreamError("interrupted", LEASE_LOST)):
            why = "another replica ended it" if ended_elsewhere else "its slot went to another stream"
            log.warning("stream %s: its lease lapsed and %s; ended here", stream_id, why)

    async def _interrupt(self, stream_id: str) -> None:
        """End the stream of an owner that died: error `interrupted` and done in
        Redis (so every resume ends the same way), and its ledger row, once."""
        client = self.client
        assert client is not None
        if not await client.set(ended_by_key(stream_id), self.process, condition=coredis.PureToken.NX, ex=self.ttl + 60):
            return
        meta = await client.hgetall(meta_key(stream_id))
        if not meta or b"finished" in meta:
            return
        count, resumable = int(meta.get(b"count", 0)), b"resumable" not in meta
        error = UpstreamError("interrupted", "the process running this generation stopped")
        events = [("error", orjson.dumps(error.as_event_data()).decode()), ("done", "error")]
        async with client.pipeline(transaction=False) as pipe:
            if resumable:  # its readers elsewhere read this ending
                pipe.xadd(events_key(stream_id), {"e": pack(events)}, identifier=f"{count + 2}-0")
                pipe.pexpire(events_key(stream_id), self.ttl * 1000)
            pipe.hset(meta_key(stream_id), {"count": count + 2, "finished": "error"})
            pipe.pexpire(meta_key(stream_id), self.ttl * 1000)
        if b"key" not in meta:  # see of_key
            log.warning("stream %s: Redis lost its description (restarted empty, or evicted it); no ledger row for it", stream_id)
            return
        record = self._copy(stream_id, meta, 0)
        record.route = meta.get(b"route", b"chat/stream").decode()
        record.tokens = int(meta[b"tokens"])
        record.finish_reason, record.error = "error", error
        record.usage = estimated_usage(int(meta[b"prompt_chars"]), record.tokens)
        record.started = float(meta[b"started"])
        facts = stream_facts(record, record.started_clock)
        # the dead owner never wrote its line: this one is what rebuilds a row the ledger drops
        log.info(orjson.dumps({"event": "stream_end", **facts}).decode())
        if self.ledger is not None:
            await self.ledger.add(facts)

    # --- followers: resume on any replica

    def _copy(self, stream_id: str, meta: dict[bytes, bytes], position: int) -> StreamRecord:
        key = meta[b"key"].decode()
        request = ChatRequest([], meta[b"backend"].decode(), meta[b"model"].decode(), 0, None)
        record = StreamRecord(stream_id, key[1:] if key else None, request, self.config.stream_buffer_bytes)
        record.skip_to(position)
        return record

    async def find(self, stream_id: str, key_name: str | None, position: int) -> StreamRecord | None:
        local = self.registry.get(stream_id, key_name)
        if local is not None and (stream_id in self.owned or local.finished):
            return local
        client = self._client()
        try:
            meta = await client.hgetall(meta_key(stream_id))
            if not of_key(meta, key_name) or b"resumable" in meta:
                return None
            count, first = int(meta[b"count"]), int(meta[b"first"])
            with anyio.move_on_after(1):  # the owner's client may be a few ms ahead of its write-behind
                while position > count and b"finished" not in meta:
                    await anyio.sleep(0.02)
                    meta = await client.hgetall(meta_key(stream_id))
                    count, first = int(meta.get(b"count", 0)), int(meta.get(b"first", 0))
            if not first <= position <= count or (b"finished" in meta and position >= count):
                return None
            limit = self.config.max_readers_per_stream  # its readers on every replica, as of the owner's last renewal, or here now
            if max(int(meta.get(b"readers", 0)), self.copies.get(stream_id, 0)) >= limit:
                raise Refusal(429, "rate_limited", f"this stream is at its limit of {limit} readers", RETRY_SOON)
            entries = await client.xrange(events_key(stream_id), f"({position}-0", "+")
        except (coredis.exceptions.RedisError, OSError) as exc:
            self._lost(exc)
            raise store_unavailable() from None
        mirror = self._copy(stream_id, meta, position)
        last = f"{position}-0".encode()
        for entry in entries:
            if not self._feed(mirror, as_bytes(entry.identifier), as_bytes(entry.field_values[b"e"])):
                return None  # a gap: those events were dropped
            last = as_bytes(entry.identifier)
        if not mirror.finished:
            self.followed[mirror] = int(last.split(b"-")[0])
            await self._wake_follower()
        owner = meta[b"owner"].decode()
        assert self.tasks is not None
        self.copies[stream_id] = self.copies.get(stream_id, 0) + 1
        self.tasks.start_soon(self._watch_copy, mirror, owner)
        return mirror

    def _feed(self, mirror: StreamRecord, entry_id: bytes, value: bytes) -> bool:
        first, events = unpack(entry_id, value)
        if first > mirror.count + 1:
            return False
        for offset, (name, data) in enumerate(events):
            if first + offset <= mirror.count:
                continue
            if name == "token":
                mirror.tokens += 1
            mirror.append_encoded(name, data.encode())
            if name == "done":
                mirror.finish_reason, mirror.finished = data, True
                mirror.notify()
        return True

    async def _wake_follower(self) -> None:
        client = self._client()
        await client.xadd(self.wake_key, {"w": "1"}, trim_strategy=coredis.PureToken.MAXLEN, threshold=10)

    async def _follow(self) -> None:
        """One blocking XREAD over every followed stream of this process."""
        woken = b"0-0"
        while True:
            client = self.client
            if client is None or not self.ok:
                await anyio.sleep(0.2)
                continue
            streams: dict[str | bytes, str | bytes] = {self.wake_key: woken}
            reading: dict[str, list[StreamRecord]] = {}  # copies of one stream (readers from different positions) share a read
            positions: dict[str, int] = {}
            for mirror, last in self.followed.items():
                key = events_key(mirror.id)
                reading.setdefault(key, []).append(mirror)
                positions[key] = min(last, positions.get(key, last))
            streams.update({key: f"{position}-0" for key, position in positions.items()})
            try:
                replies = await client.xread(streams, block=1000, count=500) or {}
            except (coredis.exceptions.RedisError, OSError) as exc:
                self._lost(exc)
                continue
            for read_key, entries in replies.items():
                key = as_bytes(read_key).decode()
                if key == self.wake_key:
                    woken = as_bytes(entries[-1].identifier)
                    continue
                for mirror in reading.get(key, []):
                    if mirror not in self.followed:  # its last reader left meanwhile
                        continue
                    for entry in entries:
                        entry_id = as_bytes(entry.identifier)
                        if not self._feed(mirror, entry_id, as_bytes(entry.field_values[b"e"])):
                            mirror.skip_to(int(entry_id.split(b"-")[0]))  # readers behind it get None: closed
                            mirror.notify()
                    if mirror.finished:
                        del self.followed[mirror]
                    else:
                        self.followed[mirror] = int(as_bytes(entries[-1].identifier).split(b"-")[0])

    async def _watch_copy(self, mirror: StreamRecord, owner: str) -> None:
        """Tell the owner while this copy has readers (its resume grace counts
        them); forget the copy when its last reader leaves."""
        await anyio.lowlevel.checkpoint()
        said = -1
        while True:
            if mirror.readers != said and not mirror.finished:
                said = mirror.readers
                await self._tell(owner, f"readers {mirror.id} {self.process} {id(mirror)} {said}")
            if not mirror.readers:
                self.followed.pop(mirror, None)
                left = self.copies.pop(mirror.id, 1) - 1
                if left:
                    self.copies[mirror.id] = left
                if not any(copy.id == mirror.id for copy in self.followed):
                    self._owner_channel.pop(mirror.id, None)
                return
            await mirror.wait_readers()

    def _announce_readers(self, pipe: Any) -> None:
        for mirror in self.followed:
            channel = self._owner_channel.get(mirror.id)
            if mirror.readers and channel:
                pipe.publish(channel, f"readers {mirror.id} {self.process} {id(mirror)} {mirror.readers}")

    async def _tell(self, owner: str, message: str) -> None:
        channel = f"{PREFIX}process:{owner}"
        self._owner_channel[message.split()[1]] = channel
        try:
            await self._client().publish(channel, message)
        except (coredis.exceptions.RedisError, OSError, Refusal):
            pass  # the renewal says it again

    # --- cancel and reader counts across replicas

    async def cancel(self, stream_id: str, key_name: str | None) -> bool:
        local = self.registry.get(stream_id, key_name)
        if local is not None and stream_id in self.owned:
            return local.cancel("cancelled")
        client = self._client()
        try:
            meta = await client.hgetall(meta_key(stream_id))
            if not of_key(meta, key_name) or b"finished" in meta or b"resumable" in meta:
                return False
            heard = await client.publish(f"{PREFIX}process:{meta[b'owner'].decode()}", f"cancel {stream_id}")
        except (coredis.exceptions.RedisError, OSError) as exc:
            self._lost(exc)
            raise store_unavailable() from None
        if not heard:  # a running stream whose owner is not listening: reconnecting to Redis, or dead (ended within a lease)
            raise store_unavailable("the process running this stream cannot be told right now; try again shortly")
        return True

    def readers(self, record: StreamRecord) -> int:
        owned = self.owned.get(record.id)
        return record.readers + (sum(n for n, _ in owned[1].remote.values()) if owned else 0)

    async def _listen(self) -> None:
        """This process's channel: cancels and reader counts for the streams it owns."""
        while True:
            client = self.client
            if client is None:
                await anyio.sleep(0.2)
                continue
            try:
                async with client.pubsub(channels=[self.channel], ignore_subscribe_messages=True) as pubsub:
                    async for message in pubsub:
                        self._heard(as_bytes(message["data"]).decode())  # type: ignore[arg-type]
            except (coredis.exceptions.RedisError, OSError) as exc:
                self._lost(exc)
                await anyio.sleep(0.5)

    def _heard(self, message: str) -> None:
        words = message.split()
        record, owned = self.owned.get(words[1], (None, None)) if len(words) > 1 else (None, None)
        if record is None or owned is None:
            return
        if words[0] == "cancel":
            record.cancel("cancelled")
        elif words[0] == "readers" and len(words) == 5:
            copy, count = f"{words[2]}/{words[3]}", int(words[4])
            if count:
                owned.remote[copy] = (count, anyio.current_time() + self.lease_ms / 1000)
            else:
                owned.remote.pop(copy, None)
            record.readers_changed()

