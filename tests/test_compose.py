"""docker-compose.yml wires two gateway replicas, one Redis and nginx into one
service: both replicas carry the same REDIS_URL, naming the compose Redis, and
the upstream of nginx.conf (the file nginx mounts) reaches both replicas."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # resolves the << merge of the replica block
    assert isinstance(loaded, dict)
    return loaded


def replicas(services: dict[str, Any]) -> dict[str, Any]:
    """The gateway services: those built from this repository."""
    return {name: service for name, service in services.items() if service.get("build") == "."}


def network_names(name: str, service: dict[str, Any]) -> set[str]:
    """The names a service answers to on compose's default network."""
    aliases = ((service.get("networks") or {}).get("default") or {}).get("aliases") or []
    return {name, *aliases}


def nginx_upstream_hosts(conf: str) -> list[str]:
    block = re.search(r"upstream\s+\w+\s*\{(.*?)\}", conf, re.S)
    assert block, "nginx.conf has no upstream block"
    return [urlsplit("//" + address).hostname or "" for address in re.findall(r"^\s*server\s+([^\s;]+)", block.group(1), re.M)]


def test_two_gateway_replicas_share_one_redis_url_naming_the_compose_redis() -> None:
    services = compose()["services"]
    gateways = replicas(services)
    assert len(gateways) >= 2, sorted(gateways)
    urls = {name: service["environment"].get("REDIS_URL") for name, service in gateways.items()}
    assert len(set(urls.values())) == 1 and None not in urls.values(), urls
    redis_host = urlsplit(next(iter(urls.values()))).hostname
    assert redis_host in services, f"REDIS_URL names {redis_host!r}, no compose service"
    assert str(services[redis_host]["image"]).split(":")[0] in ("redis", "valkey/valkey", "valkey")
    for name, service in gateways.items():
        assert redis_host in service["depends_on"], f"{name} may start before Redis (startup needs it)"


def test_the_replicas_differ_only_in_their_volume_and_network_names() -> None:
    gateways = list(replicas(compose()["services"]).values())
    first = {k: v for k, v in gateways[0].items() if k not in ("volumes", "networks")}
    for other in gateways[1:]:
        assert {k: v for k, v in other.items() if k not in ("volumes", "networks")} == first


def test_nginx_balances_over_every_replica() -> None:
    services = compose()["services"]
    gateways = replicas(services)
    nginx = next(service for service in services.values() if str(service.get("image", "")).startswith("nginx"))
    mounted = [volume.split(":") for volume in nginx["volumes"]]
    assert ["./nginx.conf", "/etc/nginx/conf.d/default.conf", "ro"] in mounted
    hosts = nginx_upstream_hosts((ROOT / "nginx.conf").read_text())
    reached = {name for name, service in gateways.items() if network_names(name, service) & set(hosts)}
    assert reached == set(gateways), f"nginx upstream {hosts} reaches {sorted(reached)} of {sorted(gateways)}"
    assert set(gateways) <= set(nginx["depends_on"])  # nginx resolves the names once, at its start


def test_the_upstream_parser_reads_several_servers() -> None:
    """The check above can fail: a block listing one host reaches one replica."""
    conf = "upstream u {\n    server app1:8000;\n    server app2:8000 max_fails=3;\n    keepalive 16;\n}\n"
    assert nginx_upstream_hosts(conf) == ["app1", "app2"]
    services = {"app": {"build": "."}, "app2": {"build": "."}}
    reached = {name for name, service in services.items() if network_names(name, service) & {"app"}}
    assert reached == {"app"}
