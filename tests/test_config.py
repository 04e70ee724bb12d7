"""Configuration from the environment (`load_config`), and the command line:
an invalid variable stops `python -m asgi_stream` with a message naming it;
`python -m asgi_stream usage` sums the ledger."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import uvicorn

import asgi_stream
from asgi_stream_core import config
from asgi_stream_core.config import BACKENDS, Config, ConfigError, load_config
from asgi_stream_core.ledger import UsageLedger

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_those_of_the_design_table() -> None:
    config = load_config({})
    assert set(config.upstreams) == {"echo"}
    assert config.default_backend == "echo" and config.default_model is None
    assert (config.max_tokens, config.max_tokens_limit) == (1024, 8192)
    assert config.api_keys == {} and config.cors_origins == frozenset()
    assert config.max_body_bytes == 1_048_576
    assert (config.max_streams, config.max_streams_per_key, config.max_readers_per_stream) == (1000, 100, 100)
    assert (config.connect_timeout, config.first_token_timeout, config.idle_timeout, config.total_timeout) == (10, 120, 60, 600)
    assert (config.heartbeat, config.resume_grace, config.resume_ttl) == (15, 5, 60)
    assert config.responses_ttl == 3600  # /v1/responses: an hour to continue a conversation
    assert config.usage_db == "usage.db"
    assert config.echo_delay == config.upstreams["echo"].token_delay == 0.05  # paced so a newcomer sees streaming


def test_every_setting_is_read() -> None:
    config = load_config({
        "DEFAULT_MODEL": " m ", "MAX_TOKENS": "5", "MAX_TOKENS_LIMIT": "6", "API_KEYS": " alice:k1 , bob:k:2 ,",
        "CORS_ORIGINS": "https://a.example, *,", "MAX_BODY_BYTES": "7", "MAX_STREAMS": "8", "MAX_STREAMS_PER_KEY": "9",
        "MAX_READERS_PER_STREAM": "14",
        "CONNECT_TIMEOUT_SECONDS": "1.5", "FIRST_TOKEN_TIMEOUT_SECONDS": "2", "IDLE_TIMEOUT_SECONDS": "3",
        "TOTAL_TIMEOUT_SECONDS": "4", "HEARTBEAT_SECONDS": " 0.5 ", "RESUME_GRACE_SECONDS": "0", "RESUME_TTL_SECONDS": "0",
        "USAGE_DB": " /tmp/x.db ", "BODY_TIMEOUT_SECONDS": "11", "SEND_TIMEOUT_SECONDS": "12", "STREAM_BUFFER_BYTES": "1024",
        "ECHO_DELAY_SECONDS": "0.25", "LOG_LEVEL": " warning ",
        "OWNER_LEASE_SECONDS": "3", "REDIS_URL": " redis://:pw@h:1/2 ", "RESPONSES_TTL_SECONDS": "13",
        "GC_THRESHOLD": "0", "GC_INTERVAL_SECONDS": "0.5",
    })  # fmt: skip
    assert config == Config(
        upstreams=config.upstreams, default_backend="echo", default_model="m", max_tokens=5, max_tokens_limit=6,
        api_keys={"k1": "alice", "k:2": "bob"}, cors_origins=frozenset({"https://a.example", "*"}), max_body_bytes=7,
        max_streams=8, max_streams_per_key=9, max_readers_per_stream=14, connect_timeout=1.5, first_token_timeout=2,
        idle_timeout=3, total_timeout=4,
        heartbeat=0.5, resume_grace=0, resume_ttl=0, usage_db="/tmp/x.db", body_timeout=11, send_timeout=12,
        stream_buffer_bytes=1024, echo_delay=0.25, log_level=logging.WARNING, owner_lease=3, responses_ttl=13,
        gc_threshold=0, gc_interval=0.5, redis_url="redis://:pw@h:1/2",
    )  # fmt: skip
    assert config.upstreams["echo"].token_delay == 0.25


@pytest.mark.parametrize("url", ["http://h:6379", "h:6379", "redis:/x", "valkey://h"])
def test_a_redis_url_of_another_scheme_is_refused_naming_redis_url_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^REDIS_URL must start with") as caught:
        load_config({"REDIS_URL": url.replace("//", "//user:hunter2@")})
    assert "hunter2" not in str(caught.value)


def test_max_tokens_defaults_to_the_limit_when_the_limit_is_below_1024() -> None:
    assert load_config({"MAX_TOKENS_LIMIT": "100"}).max_tokens == 100


# --- backends and the default backend -----------------------------------------------


def test_openai_is_configured_by_its_key_with_the_default_url() -> None:
    upstream = load_config({"OPENAI_API_KEY": "sk-1"}).upstreams["openai"]
    assert (upstream.base_url, upstream.api_key) == ("https://api.openai.com/v1", "sk-1")
    assert load_config({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}).upstreams["openai"].base_url == (
        "http://127.0.0.1:1/v1"
    )


def test_a_base_url_without_its_key_configures_nothing() -> None:
    assert "openai" not in load_config({"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}).upstreams


def key_env(name: str) -> dict[str, str]:
    """The environment that configures backend `name` (a key, or for keyless backends a URL)."""
    backend = BACKENDS[name]
    if backend.key_variable:
        return {backend.key_variable: f"key-of-{name}"}
    assert backend.url_variable
    return {backend.url_variable: "http://127.0.0.1:9"}


PREFERENCE = [name for name in ("openai", "anthropic", "gemini", "ollama") if name in BACKENDS]


@pytest.mark.parametrize("index", range(len(PREFERENCE)))
def test_the_default_backend_is_the_first_configured_in_the_design_order(index: int) -> None:
    """openai, anthropic, gemini by key, then ollama by URL: each wins over all after it."""
    env: dict[str, str] = {}
    for name in PREFERENCE[index:]:
        env |= key_env(name)
    assert load_config(env).default_backend == PREFERENCE[index]


def test_the_default_backend_is_echo_when_nothing_is_configured() -> None:
    assert load_config({"OPENAI_BASE_URL": "https://x.example"}).default_backend == "echo"


def test_default_backend_chooses_any_configured_backend() -> None:
    assert load_config({"OPENAI_API_KEY": "k", "DEFAULT_BACKEND": " echo "}).default_backend == "echo"
    assert load_config({"OPENAI_API_KEY": "k", "DEFAULT_BACKEND": "openai"}).default_backend == "openai"


# --- invalid values ----------------------------------------------------------------------

NUMBERS = ["CONNECT_TIMEOUT_SECONDS", "FIRST_TOKEN_TIMEOUT_SECONDS", "IDLE_TIMEOUT_SECONDS", "TOTAL_TIMEOUT_SECONDS",
           "HEARTBEAT_SECONDS", "BODY_TIMEOUT_SECONDS", "SEND_TIMEOUT_SECONDS"]  # fmt: skip
INTEGERS = ["MAX_TOKENS", "MAX_TOKENS_LIMIT", "MAX_BODY_BYTES", "MAX_STREAMS", "MAX_STREAMS_PER_KEY", "STREAM_BUFFER_BYTES"]
ZERO_OK = ["RESUME_GRACE_SECONDS", "RESUME_TTL_SECONDS", "ECHO_DELAY_SECONDS"]
FIELDS = {variable: (field, default) for field, (variable, default, _) in config.NUMBERS.items()}  # variable -> Config field


def config_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    return str(caught.value)


@pytest.mark.parametrize("value", ["abc", "", "1,5", "0x10", "nan", "inf", "-inf", "-1", "0"])
@pytest.mark.parametrize("name", NUMBERS + INTEGERS + ZERO_OK)
def test_an_invalid_number_names_its_variable(name: str, value: str) -> None:
    if value == "" or (value == "0" and name in ZERO_OK):  # empty means the default; 0 is meaningful for these
        field, default = FIELDS[name]
        expected = default if value == "" else 0
        assert getattr(load_config({name: value}), field) == expected and expected != getattr(load_config({name: "2048"}), field)
        return
    assert config_error({name: value}).startswith(f"{name}={value!r} ")


@pytest.mark.parametrize("name", INTEGERS)
def test_an_integer_variable_refuses_a_fraction(name: str) -> None:
    assert config_error({name: "1.5"}) == f"{name}='1.5' is not an integer"


def test_the_stream_buffer_must_hold_at_least_1024_bytes() -> None:
    assert config_error({"STREAM_BUFFER_BYTES": "1023"}) == "STREAM_BUFFER_BYTES='1023' must be at least 1024"


def test_max_tokens_above_the_limit_names_both() -> None:
    assert config_error({"MAX_TOKENS": "11", "MAX_TOKENS_LIMIT": "10"}) == "MAX_TOKENS=11 is above MAX_TOKENS_LIMIT=10"


@pytest.mark.parametrize("value", ["alice", "alice:", ":key", "a:k,b", ":"])
def test_api_keys_must_be_name_key_pairs(value: str) -> None:
    assert config_error({"API_KEYS": value}).startswith("API_KEYS must be name:key pairs")


@pytest.mark.parametrize("url", ["api.example.com", "ftp://x", "localhost:8000/v1"])
def test_a_base_url_must_be_http(url: str) -> None:
    assert config_error({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": url}) == f"OPENAI_BASE_URL={url!r} must start with http:// or https://"


def test_an_unknown_default_backend_names_the_variable_and_the_choices() -> None:
    assert config_error({"DEFAULT_BACKEND": "nope"}).startswith("DEFAULT_BACKEND='nope' is not one of echo, openai")


@pytest.mark.parametrize("value", ["verbose", "20", "warn"])
def test_an_unknown_log_level_names_the_variable_and_the_choices(value: str) -> None:
    assert config_error({"LOG_LEVEL": value}) == f"LOG_LEVEL={value!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"


def test_an_unconfigured_default_backend_names_the_variable() -> None:
    assert config_error({"DEFAULT_BACKEND": "openai"}) == "DEFAULT_BACKEND='openai' is not configured (its key is not set)"


# --- the command line ----------------------------------------------------------------------


def run_module(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m asgi_stream` with exactly `env` (plus what Python needs)."""
    base = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "asgi_stream", *args], env={**base, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize(("env", "message"), [
    ({"MAX_TOKENS": "many"}, "asgi-stream: MAX_TOKENS='many' is not an integer"),
    ({"PORT": "eighty"}, "asgi-stream: PORT='eighty' is not an integer"),
    ({"WORKERS": "0"}, "asgi-stream: WORKERS='0' must be at least 1"),
    ({"HEARTBEAT_SECONDS": "-1", "USAGE_DB": ""}, "asgi-stream: HEARTBEAT_SECONDS='-1' must be at least 0.001"),
])  # fmt: skip
def test_python_m_asgi_stream_with_an_invalid_variable_exits_naming_it(env: dict[str, str], message: str) -> None:
    done = run_module(**env)
    assert done.returncode == 2
    assert done.stderr.strip() == message and done.stdout == ""


def ledger_row(stream_id: str, key: str | None, backend: str, prompt: int, completion: int, estimated: int) -> dict[str, Any]:
    return {"stream_id": stream_id, "key_name": key, "backend": backend, "model": "m", "started_at": "2026-01-01T00:00:00Z",
            "time_to_first_token_ms": 1.0, "duration_ms": 2.0, "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "estimated": estimated, "finish_reason": "stop", "error_type": None,
            "client_disconnected": 0}  # fmt: skip


def make_ledger(path: Path) -> None:
    ledger = UsageLedger(str(path))
    ledger.write(ledger_row("s1", "alice", "echo", 1, 2, 0))
    ledger.write(ledger_row("s2", "alice", "echo", 10, 20, 1))
    ledger.write(ledger_row("s3", None, "openai", 3, 4, 0))
    ledger.close()


def test_python_m_asgi_stream_usage_sums_the_ledger_per_key_backend_model(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db")
    done = run_module("usage", USAGE_DB=str(tmp_path / "u.db"))
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert rows == [
        ["key", "backend", "model", "streams", "prompt", "completion", "total", "estimated"],
        ["-", "openai", "m", "1", "3", "4", "7", "0"],
        ["alice", "echo", "m", "2", "11", "22", "33", "1"],
    ]


def test_python_m_asgi_stream_usage_without_a_ledger_says_so(tmp_path: Path) -> None:
    done = run_module("usage", USAGE_DB=str(tmp_path / "none.db"))
    assert done.returncode == 1 and "no usage ledger at" in done.stderr
    assert not (tmp_path / "none.db").exists()


# In process too, so coverage sees main().


def test_main_usage_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    make_ledger(tmp_path / "u.db")
    monkeypatch.setenv("USAGE_DB", str(tmp_path / "u.db"))
    assert asgi_stream.main(["asgi_stream", "usage"]) == 0
    assert "alice" in capsys.readouterr().out
    monkeypatch.setenv("USAGE_DB", "")
    assert asgi_stream.main(["asgi_stream", "usage"]) == 1
    assert "no usage ledger at ''" in capsys.readouterr().err


def test_main_refuses_an_invalid_variable_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MAX_STREAMS", "0")
    assert asgi_stream.main(["asgi_stream"]) == 2
    assert capsys.readouterr().err == "asgi-stream: MAX_STREAMS='0' must be at least 1\n"


def test_main_serves_the_app_with_uvicorn_on_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    monkeypatch.setenv("HOST", "127.0.0.1")
    monkeypatch.setenv("PORT", "8123")
    assert asgi_stream.main(["asgi_stream"]) == 0
    options = {"host": "127.0.0.1", "port": 8123, "timeout_graceful_shutdown": 5, "log_level": "info", "http": asgi_stream.HTTP_PROTOCOL}
    assert calls == [(asgi_stream.app, options)] and asgi_stream.HTTP_PROTOCOL == "asgi_stream_core.connections:HttpProtocol"
