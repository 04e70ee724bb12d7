"""The optional routing file (`CONFIG_FILE`, TOML read with `tomllib`): named
upstreams and model aliases. One job: the file into a checked `Routing`.
Below the configuration: it knows the wire formats by name only, and a
problem is a RoutingError naming the entry, which load_config turns into its
ConfigError. The file holds no secret: keys are named by their variables.

    [upstreams.deepseek]
    format = "openai"                      # openai | anthropic | gemini | ollama
    base_url = "https://api.deepseek.com/v1"
    default_model = "deepseek-chat"
    keys = ["DEEPSEEK_API_KEY"]            # names of environment variables
    first_token_timeout = 20               # optional: this upstream's own deadline

    [aliases]
    smart = ["anthropic-main/claude-sonnet-4-5", "deepseek/deepseek-chat", "cheap"]
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("openai", "anthropic", "gemini", "ollama")
UPSTREAM_FIELDS = frozenset({"format", "base_url", "default_model", "keys", "first_token_timeout"})
NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class RoutingError(Exception):
    """An unusable routing file; names the entry."""


@dataclass(frozen=True, slots=True)
class NamedUpstream:
    """One `[upstreams.NAME]` table, its key variables read."""

    format: str  # the wire format: a row of config.BACKENDS
    base_url: str
    default_model: str
    keys: tuple[tuple[str, str], ...]  # (variable, value); empty for a server that needs no key
    first_token_timeout: float | None  # None: only the request's overall first-token deadline


@dataclass(frozen=True, slots=True)
class Target:
    """One step of an alias: an upstream (named, or an environment backend) and a model."""

    upstream: str
    model: str

    def __str__(self) -> str:
        return f"{self.upstream}/{self.model}"


@dataclass(frozen=True)
class Routing:
    upstreams: dict[str, NamedUpstream] = field(default_factory=dict)
    aliases: dict[str, tuple[Target, ...]] = field(default_factory=dict)  # expanded: upstream targets only, in order


def read_routing(path: str, env: Mapping[str, str], reserved: Collection[str], configured: Collection[str]) -> Routing:
    """The file at `path`. `reserved`: the environment's backend names, which no
    upstream or alias may take; `configured`: those set up, which a target may name."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise RoutingError(f"cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RoutingError(f"is not valid TOML: {exc}") from None
    unknown = set(data) - {"upstreams", "aliases"}
    if unknown:
        raise RoutingError(f"[{sorted(unknown)[0]}] is not a known table (upstreams, aliases)")
    upstreams = {name: named_upstream(name, spec, env, reserved) for name, spec in table(data, "upstreams").items()}
    raw_aliases = table(data, "aliases")
    for name in raw_aliases:
        checked_name(name, f"[aliases] {name}", [*reserved, *upstreams])
    targets = [*configured, *upstreams]
    # a target named twice (through two aliases) keeps its first place: each target gets one attempt
    aliases = {name: tuple(dict.fromkeys(expanded(name, raw_aliases, targets, ()))) for name in raw_aliases}
    return Routing(upstreams, aliases)


def table(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise RoutingError(f"{name} must be a table ([{name}])")
    return value


def checked_name(name: str, where: str, taken: Collection[str]) -> None:
    if not name or not set(name) <= NAME_CHARACTERS:
        raise RoutingError(f"{where}: the name must be letters, digits, '.', '_' or '-'")
    if name in taken:
        raise RoutingError(f"{where}: {name!r} is already the name of a backend or upstream")


def named_upstream(name: str, spec: Any, env: Mapping[str, str], reserved: Collection[str]) -> NamedUpstream:
    where = f"[upstreams.{name}]"
    checked_name(name, where, reserved)
    if not isinstance(spec, dict):
        raise RoutingError(f"{where} must be a table")
    if extra := set(spec) - UPSTREAM_FIELDS:
        raise RoutingError(f"{where}: unknown field {sorted(extra)[0]!r} (fields: {', '.join(sorted(UPSTREAM_FIELDS))})")
    wire = spec.get("format")
    if wire not in FORMATS:
        raise RoutingError(f"{where} format = {wire!r} is not one of {', '.join(FORMATS)}")
    base_url = spec.get("base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise RoutingError(f"{where} base_url must be a string starting with http:// or https://")
    default_model = spec.get("default_model")
    if not isinstance(default_model, str) or not default_model:
        raise RoutingError(f"{where} default_model must be a non-empty string")
    variables = spec.get("keys", [])
    if not isinstance(variables, list) or not all(isinstance(v, str) and v for v in variables):
        raise RoutingError(f"{where} keys must be a list of environment variable names")
    keys = []
    for variable in variables:
        value = env.get(variable, "").strip()
        if not value:
            raise RoutingError(f"{where} keys: the environment variable {variable} is not set")
        keys.append((variable, value))
    timeout = spec.get("first_token_timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not 0 < timeout < math.inf):  # fmt: skip
        raise RoutingError(f"{where} first_token_timeout must be a positive number of seconds")
    return NamedUpstream(wire, base_url.rstrip("/"), default_model, tuple(keys),
                         None if timeout is None else float(timeout))  # fmt: skip


def expanded(name: str, aliases: dict[str, Any], upstreams: list[str], path: tuple[str, ...]) -> tuple[Target, ...]:
    """The alias's targets in order, the aliases it names expanded in place; `path`:
    the aliases being expanded around it (naming one of them again is a cycle)."""
    where = f"[aliases] {name}"
    if name in path:
        raise RoutingError(f"[aliases] {path[0]}: a cycle ({' -> '.join((*path, name))})")
    entries = aliases[name]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise RoutingError(f"{where} must be a non-empty list of '<upstream>/<model>' or alias names")
    targets: list[Target] = []
    for i, entry in enumerate(entries):
        upstream, slash, model = entry.partition("/")
        if not slash:
            if entry not in aliases:
                raise RoutingError(f"{where}[{i}] = {entry!r}: no alias of that name (an upstream target is '<upstream>/<model>')")
            targets.extend(expanded(entry, aliases, upstreams, (*path, name)))
        elif upstream not in upstreams:
            raise RoutingError(f"{where}[{i}] = {entry!r}: no upstream {upstream!r} (upstreams: {', '.join(upstreams)})")
        elif not model:
            raise RoutingError(f"{where}[{i}] = {entry!r}: the model is missing")
        else:
            targets.append(Target(upstream, model))
    return tuple(targets)
