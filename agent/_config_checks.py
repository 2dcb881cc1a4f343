"""The per-key validators of agent/config.py: each returns why a value is invalid, or None.

A validator gets the value already coerced to the key's type (agent/_config_values.py) and says
what would be valid; the loader puts the key and the value in front of it in the ConfigError.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], str | None]  # returns an explanation when the value is invalid


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or greater"


def port(v: Any) -> str | None:
    return None if 1 <= v <= 65535 else "must be a TCP port from 1 to 65535"


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else "must be one of " + ", ".join(repr(c) for c in choices)

    return check


def absolute(v: Any) -> str | None:
    return None if os.path.isabs(v) else "must be an absolute path"


def host_port(v: Any, *, empty_ok: bool = False) -> str | None:
    if v == "" and empty_ok:
        return None
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return "must be HOST:PORT, e.g. 127.0.0.1:9500" + (
            ', or "" to turn it off' if empty_ok else ""
        )
    return None


def metrics_address(v: Any) -> str | None:
    return host_port(v, empty_ok=True)


def listen_address(v: Any) -> str | None:
    """HOST:PORT where port 0 asks the kernel for a free port (tests, several daemons)."""
    if isinstance(v, str) and v.endswith(":0") and v[:-2]:
        return None
    return host_port(v)


def host_listener(v: Any) -> str | None:
    if v == "":
        return None
    why = listen_address(v)
    return f'{why}, or "" to turn the host listener off' if why else None


def absolute_or_empty(v: Any) -> str | None:
    return None if v == "" else absolute(v)


def repositories(v: Any) -> str | None:
    for item in v:
        why = repository(item)
        if why:
            return f"has {item!r}, which {why}"
    return None


def ids(v: Any) -> str | None:
    return None if all(0 <= i < 2**32 for i in v) else "must be a list of ids from 0 to 4294967295"


_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62})$")


def name(v: Any) -> str | None:
    return None if _NAME.match(v) else "must be 1-63 characters of a-z, 0-9, '.', '_', '-'"


def size(v: Any) -> str | None:
    from agent.limits import parse_bytes

    if v in ("", "0"):
        return None
    try:
        parse_bytes(v)
    except ValueError as exc:
        return f'{exc}; write bytes or a size such as 512MiB or 4GiB, or "0" for no limit'
    return None


def repo_or_empty(v: Any) -> str | None:
    if v == "":
        return None
    return repository(v)


_REPO = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+$")


def repository(v: Any) -> str | None:
    if not _REPO.match(v):
        return "must be a repository like registry.example.com/team/images (no tag, no digest)"
    return None


def subnet(v: Any) -> str | None:
    try:
        net = ipaddress.ip_network(v)
    except ValueError:
        return "must be an IPv4 network like 10.203.0.0/30"
    return (
        None
        if net.version == 4 and net.num_addresses >= 4
        else "must be IPv4 with room for 2 hosts"
    )


__all__ = [
    "Check",
    "absolute",
    "absolute_or_empty",
    "host_listener",
    "host_port",
    "ids",
    "listen_address",
    "metrics_address",
    "name",
    "non_negative",
    "one_of",
    "port",
    "positive",
    "repo_or_empty",
    "repositories",
    "repository",
    "size",
    "subnet",
]
