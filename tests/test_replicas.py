"""Several real gateway processes sharing one real redis-server are one
service: a stream resumes losslessly on any replica (uvicorn, hypercorn's trio
worker, `uvicorn --workers 2`), DELETE reaches the owner from any replica, the
stream limits hold across replicas under a burst, a SIGKILLed owner's readers
elsewhere are told `interrupted`, and Redis going away and coming back mid-stream
gets the defined answers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from asgi_stream_core.config import ConfigError
from tests.redis_server import RedisServer
from tests.replicas import (
    SLOWNESS,
    Read,
    cancel_across,
    chat,
    follow,
    gateway_env,
    kill_owner_while_followed,
    ledger_rows,
    positions,
    quitting,
    read_stream,
    respond,
    resume,
    run_replicas,
    seen_with,
    stream_ids,
    wait_for,
    words,
)
from tests.servers import Process
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(300)
SLOW = SLOWNESS


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(respond) as fake:
        yield fake


@contextmanager
def running_redis(tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def replicas(upstream: FakeUpstream, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Process]]:
    """Two uvicorn processes and one hypercorn trio worker, one REDIS_URL."""
    with run_replicas(["uvicorn", "uvicorn", "hypercorn-trio"], gateway_env(upstream, redis.url),
                      tmp_path_factory.mktemp("replicas")) as started:  # fmt: skip
        yield started


def assert_lossless(reads: list[Read], prompt_words: list[str]) -> None:
    events = [event for read in reads for event in read.events]
    assert positions(events) == list(range(1, len(events) + 1)), positions(events)  # each event once, in order
    assert len(stream_ids(events)) == 1  # one generation, never a restart
    assert "".join(data for event, data, _ in events if event == "token") == "".join(prompt_words)
    assert [event for event, _, _ in events][-2:] == ["usage", "done"] and events[-1][1] == "stop"


# --- 1. resume on another replica ---------------------------------------------------


@pytest.mark.parametrize("owner", [0, 1, 2], ids=["owner-uvicorn", "owner-uvicorn-2", "owner-hypercorn-trio"])
def test_a_stream_cut_twice_resumes_on_the_two_other_replicas_with_nothing_lost(
    owner: int, replicas: list[Process], upstream: FakeUpstream
) -> None:
    prompt = f"slow 40 0.1 owner{owner}"
    first, second, third = replicas[owner], replicas[(owner + 1) % 3], replicas[(owner + 2) % 3]
    start = read_stream("POST", first.url + "/chat/stream", json=chat(prompt), stop_after=3)
    assert start.status == 200 and start.tokens == words(3)
    middle = resume(second.url, start.last_id, stop_after=4)
    assert middle.status == 200, (middle.status, middle.body)
    rest = resume(third.url, middle.last_id)
    assert rest.status == 200, (rest.status, rest.body)
    assert_lossless([start, middle, rest], words(40))
    assert len(seen_with(upstream, prompt)) == 1  # one upstream request, however the reads were routed
    # the final event cannot be resumed from, on any replica (as in one process)
    for replica in replicas:
        assert resume(replica.url, rest.last_id).status == 204


def test_an_unknown_or_foreign_stream_still_gets_204_on_every_replica(replicas: list[Process]) -> None:
    for replica in replicas:
        assert resume(replica.url, "nosuchstream.1").status == 204
        assert resume(replica.url, "not-an-id").status == 204


def test_uvicorn_with_two_workers_resumes_through_whichever_worker_accepts(
    upstream: FakeUpstream, redis: RedisServer, tmp_path: Path
) -> None:
    """The issue's reproduction: one stream cut after 3 tokens, then reconnects
    with its Last-Event-ID; without Redis most reached the wrong worker (204)."""
    prompt = "slow 60 0.1 workers"
    with run_replicas(["uvicorn-workers-2"], gateway_env(upstream, redis.url), tmp_path) as (server,):
        reads = [read_stream("POST", server.url + "/chat/stream", json=chat(prompt), stop_after=3)]
        for _ in range(12):  # each on a new connection; the kernel hands it to either worker
            reads.append(resume(server.url, reads[-1].last_id, stop_after=2))
            assert reads[-1].status == 200, [read.status for read in reads]
        reads.append(resume(server.url, reads[-1].last_id))
        assert reads[-1].status == 200
    assert_lossless(reads, words(60))
    assert len(seen_with(upstream, prompt)) == 1


def test_control_without_redis_another_process_does_not_hold_the_stream(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The resume tests above can fail: without REDIS_URL a reconnect that
    reaches a process other than the owner gets 204, which stops EventSource.
    Two processes, not `--workers 2`: which worker the kernel hands a
    connection to is not ours to choose (one pinned core gave all 20 to one)."""
    prompt = "slow 60 0.1 control"
    env = {**gateway_env(upstream, ""), "REDIS_URL": ""}
    with run_replicas(["uvicorn", "uvicorn"], env, tmp_path) as (owner, other):
        first = read_stream("POST", owner.url + "/chat/stream", json=chat(prompt), stop_after=3)
        assert resume(other.url, first.last_id, stop_after=1).status == 204
        assert resume(owner.url, first.last_id, stop_after=1).status == 200


# --- 3. DELETE on a replica that does not own the stream ------------------------------


def test_delete_on_a_replica_that_does_not_own_the_stream_cancels_its_upstream(
    replicas: list[Process], upstream: FakeUpstream
) -> None:
    latencies = []
    for i, (owner, other) in enumerate([(0, 1), (1, 2), (2, 0), (0, 2)]):
        prompt = f"forever delete{i}"
        latency = cancel_across(replicas[owner], replicas[other], upstream, prompt)
        latencies.append(latency)
    assert all(0 <= latency < 5 * SLOW for latency in latencies), latencies


# --- 4. a burst of starts against the shared limits -----------------------------------

KEYS = {"alice": "ka", "bob": "kb", "carol": "kc", "dave": "kd", "erin": "ke", "frank": "kf"}


@pytest.fixture(scope="module")
def limited(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Process]]:
    """Three replicas on a Redis of their own: the limits count every stream in it."""
    tmp = tmp_path_factory.mktemp("limited")
    with running_redis(tmp) as redis:
        # A lease far longer than wait_all_free waits: a slot that comes back was freed at `done`, not by expiry.
        env = gateway_env(upstream, redis.url, MAX_STREAMS="4", MAX_STREAMS_PER_KEY="2", RESUME_GRACE_SECONDS="0",
                          OWNER_LEASE_SECONDS="300", API_KEYS=",".join(f"{name}:{key}" for name, key in KEYS.items()))  # fmt: skip
        with run_replicas(["uvicorn", "uvicorn", "hypercorn-trio"], env, tmp) as started:
            yield started


def burst(replicas: list[Process], keys: list[str], tag: str) -> list[tuple[int, httpx.Headers, bytes]]:
    """Start one stream per entry of `keys` at once, spread round robin over
    the replicas; hold every admitted stream open until all have answered,
    then hang up (RESUME_GRACE_SECONDS=0: each is cancelled, and `done` frees its slot)."""
    answered = threading.Barrier(len(keys) + 1)
    release = threading.Event()
    go = threading.Barrier(len(keys))

    def start(i: int) -> tuple[int, httpx.Headers, bytes]:
        url = replicas[i % len(replicas)].url + "/chat/stream"
        headers = {"authorization": f"Bearer {keys[i]}"}
        with httpx.Client(timeout=60 * SLOW) as client:
            go.wait(60 * SLOW)
            with client.stream("POST", url, json=chat(f"forever {tag}{i}"), headers=headers) as response:
                body = b"" if response.status_code == 200 else response.read()
                answered.wait(60 * SLOW)
                release.wait(120)
                return response.status_code, response.headers, body

    with ThreadPoolExecutor(len(keys)) as pool:
        futures = [pool.submit(start, i) for i in range(len(keys))]
        answered.wait(60 * SLOW)
        release.set()
        return [future.result() for future in futures]


def refusal_type(body: bytes) -> str:
    return str(json.loads(body)["error"]["type"])


def wait_all_free(replicas: list[Process], key: str) -> None:
    """Until one more start on each replica is admitted: the burst's slots are back."""
    assert wait_for(lambda: all(read_stream("POST", r.url + "/chat/stream", json=chat("slow 1 0"),
                                            headers={"authorization": f"Bearer {key}"}).status == 200
                                for r in replicas), 60, step=0.5)  # fmt: skip


def test_a_burst_over_three_replicas_admits_exactly_max_streams(limited: list[Process]) -> None:
    keys = [key for key in KEYS.values() for _ in range(2)]  # 12 starts, 2 per key: only MAX_STREAMS=4 binds
    for round_ in range(2):  # the second round finds every slot of the first free again (freed at done)
        answers = burst(limited, keys, f"global{round_}")
        statuses = Counter(status for status, _, _ in answers)
        assert statuses == {200: 4, 503: 8}, statuses
        for status, headers, body in answers:
            if status == 503:
                assert refusal_type(body) == "overloaded" and int(headers["retry-after"]) >= 1
        wait_all_free(limited, "ka")


def test_a_burst_of_one_key_over_three_replicas_admits_exactly_max_streams_per_key(limited: list[Process]) -> None:
    for round_ in range(2):
        answers = burst(limited, ["kb"] * 9, f"key{round_}")
        statuses = Counter(status for status, _, _ in answers)
        assert statuses == {200: 2, 429: 7}, statuses
        for status, headers, body in answers:
            if status == 429:
                assert refusal_type(body) == "rate_limited" and int(headers["retry-after"]) >= 1
        wait_all_free(limited, "kb")


# --- 5. SIGKILL of an owner ------------------------------------------------------------


def test_sigkill_of_the_owner_interrupts_readers_elsewhere_within_the_lease(upstream: FakeUpstream, tmp_path: Path) -> None:
    """On a Redis of its own: any replica on it may be the one that notices the
    dead owner and writes the row, and only these three have ledgers."""
    lease = 2
    dbs = [tmp_path / f"usage-{i}.db" for i in range(3)]
    with running_redis(tmp_path) as redis, run_replicas(
        ["uvicorn", "uvicorn", "hypercorn-trio"],
        gateway_env(upstream, redis.url, OWNER_LEASE_SECONDS=str(lease), MAX_STREAMS="1"),
        tmp_path,
        lambda i: {"USAGE_DB": str(dbs[i])},
    ) as (owner, b, c):
        start = read_stream("POST", owner.url + "/chat/stream", json=chat("forever sigkill"), stop_after=2)
        stream_id = start.last_id.rsplit(".", 1)[0]
        read, killed = kill_owner_while_followed(owner, b, start.last_id)
        told = time.monotonic() - killed
        assert read.status == 200
        names = [event for event, _, _ in read.events]
        assert names[-2:] == ["error", "done"] and set(names[:-2]) <= {"token"}, names[-5:]
        assert json.loads(read.of("error")[0])["type"] == "interrupted" and read.of("done") == ["error"]
        assert told < lease + 10 * SLOW, told  # the lease bound, with room for a loaded machine
        events = start.events + read.events
        assert positions(events) == list(range(1, len(events) + 1))
        # its slot came free (MAX_STREAMS=1): a new stream is admitted
        assert wait_for(lambda: read_stream("POST", c.url + "/chat/stream", json=chat("slow 1 0")).status == 200, 10 * SLOW, 0.5)
        # a later resume replays what was written and ends the same way
        again = resume(c.url, start.events[0][2])
        assert again.status == 200 and again.events[-2:] == read.events[-2:]
        assert positions(again.events) == list(range(2, len(events) + 1))
        assert resume(b.url, start.events[0][2]).events == again.events
        # one ledger row for the stream, across every replica's ledger
        assert wait_for(lambda: len(ledger_rows(dbs, stream_id)) >= 1, 10 * SLOW), "no ledger row"
        time.sleep(1)
        rows = ledger_rows(dbs, stream_id)
        assert len(rows) == 1 and rows[0]["error_type"] == "interrupted", rows


# --- 5b. an owner stalled past its lease (SIGSTOP: a starved event loop) ---------------


def test_an_owner_stalled_past_its_lease_ends_its_stream_and_never_takes_back_the_slot(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The owner is alive but silent for longer than its lease, so to Redis it looks dead.
    The other replica ends its stream and gives its slot to a new stream. Back, the owner
    must tell its own client `interrupted` too, and must not take the slot back: with
    MAX_STREAMS=1 the shared count must never reach 2. The two share one ledger file."""
    db = tmp_path / "usage.db"
    settings = {"OWNER_LEASE_SECONDS": "1", "MAX_STREAMS": "1", "USAGE_DB": str(db)}
    with running_redis(tmp_path) as redis, run_replicas(["uvicorn", "hypercorn-trio"], gateway_env(upstream, redis.url, **settings),
                                                        tmp_path) as (owner, other):  # fmt: skip
        got: list[tuple[str, str, str]] = []
        quit = threading.Event()
        with ThreadPoolExecutor(1) as pool, quitting(quit):
            first = pool.submit(follow, "POST", owner.url, got, quit, json=chat("forever stalled"))
            assert wait_for(lambda: len(got) >= 3, 20 * SLOW), "the owner never streamed"
            os.killpg(owner.popen.pid, signal.SIGSTOP)
            try:
                # once its lease has lapsed, the slot goes to a new stream on the other replica
                # (cut after its first event; the resume grace keeps it running and holding the slot)
                assert wait_for(
                    lambda: read_stream("POST", other.url + "/chat/stream", json=chat("forever newcomer"), stop_after=1).status == 200,
                    20 * SLOW,
                    0.2,
                ), "the lapsed slot never came free"
                ended_by = f"asgi-stream:{got[0][2].rsplit('.', 1)[0]}:ended-by"  # the other replica took it for dead
                assert wait_for(lambda: redis.command("EXISTS", ended_by) == b":1\r\n", 20 * SLOW), "nobody ended the stream"
            finally:
                os.killpg(owner.popen.pid, signal.SIGCONT)
            counts = []
            deadline = time.monotonic() + 3  # three leases of renewals, the owner's first ones among them
            while time.monotonic() < deadline:
                counts.append(int(redis.command("ZCARD", "asgi-stream:slots")[1:-2]))
                time.sleep(0.02)
            read = first.result(60 * SLOW)
        assert max(counts) == 1, Counter(counts)
        names = [event for event, _, _ in read.events]
        assert names[-2:] == ["error", "done"] and read.of("done") == ["error"], names[-5:]
        assert json.loads(read.of("error")[0])["type"] == "interrupted"
        # what Redis holds ends once, as the other replica wrote it: the owner wrote nothing past that
        again = resume(other.url, read.events[0][2])
        assert [event for event, _, _ in again.events][-2:] == ["error", "done"] and again.of("done") == ["error"]
        assert positions(again.events) == list(range(positions(read.events)[0] + 1, positions(again.events)[-1] + 1))
        assert [json.loads(error)["message"] for error in again.of("error")] == ["the process running this generation stopped"]
        stream_id = read.last_id.rsplit(".", 1)[0]
        assert wait_for(lambda: len(ledger_rows([db], stream_id)) >= 1, 10 * SLOW), "no ledger row"
        rows = ledger_rows([db], stream_id)
        assert len(rows) == 1 and rows[0]["error_type"] == "interrupted", rows


# --- 6. Redis stopped and restarted mid-stream ----------------------------------------


def test_redis_stopped_mid_stream_then_restarted(upstream: FakeUpstream, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        env = gateway_env(upstream, redis.url)
        with run_replicas(["uvicorn", "hypercorn-trio"], env, tmp_path) as (a, b):
            healthy = httpx.get(a.url + "/healthz", timeout=30)
            assert healthy.status_code == 200
            got: list[tuple[str, str, str]] = []
            with ThreadPoolExecutor(1) as pool:
                reader = pool.submit(follow, "POST", a.url, got, json=chat("slow 50 0.1 outage"))
                assert wait_for(lambda: len(got) >= 3, 20 * SLOW)
                redis.stop()
                assert not redis.ping()
                during = []
                for replica in (a, b):
                    refused = read_stream("POST", replica.url + "/chat/stream", json=chat("slow 1 0"), timeout=60 * SLOW)
                    during.append(refused.status)
                    assert refused.status == 503, (refused.status, refused.body)
                    assert refusal_type(refused.body) == "store_unavailable" and int(refused.headers["retry-after"]) >= 1
                    health = httpx.get(replica.url + "/healthz", timeout=60 * SLOW)
                    assert health.status_code == 200 and health.text != healthy.text, health.text  # says the store is down
                    assert "store" in health.text.lower()
                # a resume the other replica cannot serve: 503, never a 204 nor a gap
                cut = resume(b.url, got[0][2], timeout=60 * SLOW)
                assert cut.status == 503, cut.status
                read = reader.result(60 * SLOW)
            # the owner's own reader carried on undisturbed
            assert read.status == 200
            assert_lossless([read], words(50))
            # Redis comes back (empty, as a restarted cache would): service resumes by itself
            redis.start()  # same port
            for replica in (a, b):
                assert wait_for(lambda r=replica: read_stream("POST", r.url + "/chat/stream", json=chat("slow 2 0")).status == 200,
                                30 * SLOW, 0.5), f"{replica.name} did not recover"  # fmt: skip
                again = read_stream("POST", replica.url + "/chat/stream", json=chat("slow 3 0"))
                assert again.tokens == words(3) and again.of("done") == ["stop"]
                assert httpx.get(replica.url + "/healthz", timeout=30).text == healthy.text
    finally:
        redis.stop()


# --- a process where the [redis] extra is missing --------------------------------------


def test_redis_url_without_the_redis_extra_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image built without `asgi-stream[redis]` (the Dockerfile installs only the
    core dependencies) must refuse to start with a message naming REDIS_URL and the
    extra, like any invalid setting, not with a ModuleNotFoundError traceback."""
    import sys

    import asgi_stream

    monkeypatch.setitem(sys.modules, "coredis", None)  # as if not installed: importing it raises ImportError
    monkeypatch.delitem(sys.modules, "asgi_stream_core.stores.redis", raising=False)
    gateway = asgi_stream.Gateway({"REDIS_URL": "redis://127.0.0.1:1/0", "USAGE_DB": ""})
    with pytest.raises(ConfigError, match="REDIS_URL") as refused:
        gateway.start()  # reading the settings is what fails
    assert "asgi-stream[redis]" in str(refused.value)
