"""Typed, frozen configuration, read from TOML and ``AGENT_<SECTION>_<KEY>`` variables.

Every key is declared once, as a dataclass field whose metadata holds its help text and validator.
Loading goes: TOML file (optional) -> environment overrides -> type coercion -> per-field
validation -> cross-field checks. Any problem raises :class:`ConfigError` naming the key, the value
and what would be valid; only the entry point turns that into an exit code.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

DEFAULT_PATH = Path("/etc/build-agent/config.toml")
ENV_PREFIX = "AGENT_"

Check = Callable[[Any], str | None]  # returns an explanation when the value is invalid


def _key(default: Any, help: str, check: Check | None = None, *, secret: bool = False) -> Any:
    meta = {"help": help, "check": check, "secret": secret}
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata=meta)
    return field(default=default, metadata=meta)


# --- validators ---------------------------------------------------------------------------------


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or greater"


def _port(v: Any) -> str | None:
    return None if 1 <= v <= 65535 else "must be a TCP port from 1 to 65535"


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else "must be one of " + ", ".join(repr(c) for c in choices)

    return check


def _absolute(v: Any) -> str | None:
    return None if os.path.isabs(v) else "must be an absolute path"


def _host_port(v: Any, *, empty_ok: bool = False) -> str | None:
    if v == "" and empty_ok:
        return None
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return "must be HOST:PORT, e.g. 127.0.0.1:9500" + (
            ', or "" to turn it off' if empty_ok else ""
        )
    return None


def _metrics_address(v: Any) -> str | None:
    return _host_port(v, empty_ok=True)


def _listen_address(v: Any) -> str | None:
    """HOST:PORT where port 0 asks the kernel for a free port (tests, several daemons)."""
    if isinstance(v, str) and v.endswith(":0") and v[:-2]:
        return None
    return _host_port(v)


def _host_listener(v: Any) -> str | None:
    if v == "":
        return None
    why = _listen_address(v)
    return f'{why}, or "" to turn the host listener off' if why else None


def _absolute_or_empty(v: Any) -> str | None:
    return None if v == "" else _absolute(v)


def _repositories(v: Any) -> str | None:
    for item in v:
        why = _repository(item)
        if why:
            return f"has {item!r}, which {why}"
    return None


def _ids(v: Any) -> str | None:
    return None if all(0 <= i < 2**32 for i in v) else "must be a list of ids from 0 to 4294967295"


_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62})$")


def _name(v: Any) -> str | None:
    return None if _NAME.match(v) else "must be 1-63 characters of a-z, 0-9, '.', '_', '-'"


def _size(v: Any) -> str | None:
    from agent.limits import parse_bytes

    if v in ("", "0"):
        return None
    try:
        parse_bytes(v)
    except ValueError as exc:
        return f'{exc}; write bytes or a size such as 512MiB or 4GiB, or "0" for no limit'
    return None


def _repo_or_empty(v: Any) -> str | None:
    if v == "":
        return None
    return _repository(v)


_REPO = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+$")


def _repository(v: Any) -> str | None:
    if not _REPO.match(v):
        return "must be a repository like registry.example.com/team/images (no tag, no digest)"
    return None


def _subnet(v: Any) -> str | None:
    try:
        net = ipaddress.ip_network(v)
    except ValueError:
        return "must be an IPv4 network like 10.203.0.0/30"
    return (
        None
        if net.version == 4 and net.num_addresses >= 4
        else "must be IPv4 with room for 2 hosts"
    )


# --- sections -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = _key(
        "/run/build-agent/agent.sock",
        "control socket path (ignored under socket activation)",
        _absolute,
    )
    socket_group: str = _key(
        "build-agent", 'group owning the 0660 socket ("" keeps the daemon\'s group)'
    )
    state_dir: str = _key("/var/lib/build-agent", "records, logs and toolchain storage", _absolute)
    runtime_dir: str = _key(
        "/run/build-agent", "runtime files (pid files, generated configs)", _absolute
    )
    metrics_address: str = _key(
        "127.0.0.1:9500", 'HOST:PORT of /metrics; "" turns metrics off', _metrics_address
    )
    allowed_uids: list[int] = _key(
        [0], "uids that may build, and read and cancel their own builds", _ids
    )
    allowed_gids: list[int] = _key(
        [], "gids that may build, and read and cancel their own builds", _ids
    )
    read_uids: list[int] = _key(
        [], "uids that may read every build (status, list, logs), resolve and info", _ids
    )
    read_gids: list[int] = _key([], "gids that may read every build, resolve and info", _ids)
    shutdown_grace: float = _key(
        30.0, "seconds running builds get to finish at shutdown", _non_negative
    )
    max_frame: int = _key(1 << 20, "largest control frame in bytes", _positive)
    log_level: str = _key(
        "info", "debug | info | warning | error", _one_of("debug", "info", "warning", "error")
    )
    log_format: str = _key(
        "auto", "auto (json off a TTY) | json | text", _one_of("auto", "json", "text")
    )


@dataclass(frozen=True)
class BuildConfig:
    toolchain: str = _key(
        "auto", "auto | buildkit | buildah", _one_of("auto", "buildkit", "buildah")
    )
    max_concurrent_builds: int = _key(2, "builds running at once", _positive)
    max_queued: int = _key(
        100, "builds waiting beyond the running ones; more get 'busy'", _non_negative
    )
    timeout: float = _key(3600.0, "default build timeout in seconds", _positive)
    base_repo: str = _key("", "repository where built base images go", _repo_or_empty)
    docker_config: str = _key(
        "/etc/build-agent/docker-config.json", "registry credentials (read by the proxy alone)"
    )
    retention_days: float = _key(14.0, "records and logs older than this are pruned", _positive)
    retention_count: int = _key(1000, "at most this many finished records are kept", _positive)
    resolve_ttl: float = _key(60.0, "seconds a resolved ref stays cached", _non_negative)
    prefetch_refs: list[str] = _key([], "refs resolved periodically so lookups are warm")
    prefetch_interval: float = _key(300.0, "seconds between prefetch rounds", _positive)
    from_max_age: float = _key(
        0.0,
        "seconds a cached digest of a FROM image may be old to go into a content key (0: ask "
        "the registry on every build; at most build.resolve_ttl)",
        _non_negative,
    )
    cache_repo: str = _key(
        "", "BuildKit registry cache repository (buildkit toolchain only)", _repo_or_empty
    )
    log_tail_lines: int = _key(20, "log lines quoted in a failed build's error", _positive)
    memory_max: str = _key(
        "4GiB",
        'memory of one build\'s processes together (bytes or e.g. 512MiB, 4GiB; "0": no '
        "limit); a request may ask for less",
        _size,
    )
    pids_max: int = _key(
        2048,
        "processes of one build at once (0: no limit); a request may ask for less",
        _non_negative,
    )
    cpu_max: float = _key(
        0.0,
        "CPUs one build may use, fractional (0: no limit); a request may ask for less",
        _non_negative,
    )
    storage_max: str = _key(
        "20GiB",
        "disk the toolchain's local storage may keep (buildah's image store, BuildKit's cache; "
        'bytes or e.g. 20GiB; "0": no budget): pruned back under it, least recently used first',
        _size,
    )
    buildah_driver: str = _key(
        "auto",
        "buildah's storage driver: auto (overlay where a native overlay mount works, else vfs), "
        "overlay, vfs",
        _one_of("auto", "overlay", "vfs"),
    )


@dataclass(frozen=True)
class RouteConfig:
    name: str = _key("", "route name: /v2/<name>/... on the proxy", _name)
    upstream: str = _key(
        "", "upstream repository prefix, e.g. registry.example.com/team/images", _repository
    )
    access: str = _key("pull", "push | pull", _one_of("push", "pull"))
    children: bool = _key(
        False, "serve the route to build children (in the sandbox), read-only unless builds"
    )
    builds: list[str] = _key(
        [],
        "repositories whose builds (their push targets) may also write through it from the "
        "sandbox, with their build login",
        _repositories,
    )


@dataclass(frozen=True)
class RegistryConfig:
    host: str = _key("", "registry host[:port] as it appears in references")
    name: str = _key("", "mirror route name (derived from host when empty)")
    http: bool = _key(False, "plain HTTP instead of HTTPS")
    insecure: bool = _key(False, "HTTPS without certificate verification")
    mirror: bool = _key(True, "serve read-only pulls of this registry for FROM lines")


@dataclass(frozen=True)
class CredentialConfig:
    host: str = _key("", "registry host[:port]")
    username: str = _key("", "user name")
    password: str = _key("", "password or token", secret=True)


@dataclass(frozen=True)
class ProxyConfig:
    port: int = _key(
        8080, "port of the proxy inside the sandbox: children use localhost:<port>", _port
    )
    host_address: str = _key(
        "127.0.0.1:8079",
        'host-side listener for operators, token required (port 0: any free port; "": off)',
        _host_listener,
    )
    host_token_file: str = _key(
        "",
        'file (0600) holding the host listener\'s token; "": the daemon makes one at '
        "<runtime_dir>/proxy-host.token",
        _absolute_or_empty,
    )
    routes: list[RouteConfig] = _key([], "static routes ([[proxy.routes]])")
    registries: list[RegistryConfig] = _key(
        [], "per-upstream transport settings ([[proxy.registries]])"
    )
    credentials: list[CredentialConfig] = _key([], "inline credentials ([[proxy.credentials]])")
    token_ttl: float = _key(
        60.0, "bearer token lifetime when the token server gives none", _positive
    )
    helper_timeout: float = _key(10.0, "seconds a docker-credential helper may take", _positive)
    retries: int = _key(4, "attempts for retryable upstream requests", _positive)
    retry_max_backoff: float = _key(5.0, "cap of the retry backoff in seconds", _positive)
    connect_timeout: float = _key(10.0, "upstream connect timeout in seconds", _positive)


@dataclass(frozen=True)
class SandboxConfig:
    mode: str = _key(
        "on", "on | off (off is reported loudly by info and the logs)", _one_of("on", "off")
    )
    netns: str = _key("build-agent", "name of the children's network namespace", _name)
    egress: str = _key("none", "none | nat", _one_of("none", "nat"))
    nat_subnet: str = _key("10.203.0.0/30", "veth addresses for egress = nat", _subnet)


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    source: str = field(default="", compare=False)  # where it was read from, for check-config

    def effective(self, *, mask_secrets: bool = True) -> dict[str, Any]:
        """The config as plain data (for check-config and info), secrets replaced by '***'."""
        return {
            s.name: _dump(getattr(self, s.name), mask_secrets)
            for s in dataclasses.fields(self)
            if s.name != "source"
        }


_SECTIONS: dict[str, type] = {
    "daemon": DaemonConfig,
    "build": BuildConfig,
    "proxy": ProxyConfig,
    "sandbox": SandboxConfig,
}


def _dump(obj: Any, mask: bool) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if mask and f.metadata.get("secret") and value:
                out[f.name] = "***"
            else:
                out[f.name] = _dump(value, mask)
        return out
    if isinstance(obj, list):
        return [_dump(v, mask) for v in obj]
    return obj


# --- loading ------------------------------------------------------------------------------------


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate. ``path=None`` reads the default path if it exists, else pure defaults."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    source = "defaults"
    explicit = path is not None
    p = Path(path) if path is not None else DEFAULT_PATH
    if explicit or p.exists():
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"config file {p} does not exist; create it or pass --config"
            ) from None
        except OSError as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
        source = str(p)
    for name in raw:
        if name not in _SECTIONS:
            raise ConfigError(
                f"unknown section [{name}] in {source}; valid sections: " + ", ".join(_SECTIONS)
            )
    _apply_env(raw, env)
    sections = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name} must be a table ([{name}]), got {type(table).__name__}")
        sections[name] = _build(cls, table, name)
    config = Config(**sections, source=source)
    _cross_check(config)
    return config


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in _SECTIONS or not key:
            continue  # AGENT_SOCKET, AGENT_BUILDKITD ... belong to other readers
        cls = _SECTIONS[section]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if key not in fields:
            raise ConfigError(
                f"{var}: [{section}] has no key {key!r}; valid keys: " + ", ".join(fields)
            )
        raw.setdefault(section, {})[key] = _from_env(var, text, _hint(cls, key))


def _hint(cls: type, key: str) -> Any:
    return typing.get_type_hints(cls)[key]


def _from_env(var: str, text: str, hint: Any) -> Any:
    """Environment values are strings; turn them into what the TOML would have held."""
    if hint is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{var}={text!r} is not a boolean; use true or false")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{var}={text!r} is not an integer") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{var}={text!r} is not a number") from None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{var} must be a JSON list of tables: {exc}") from None
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return [_from_env(var, p, item) for p in parts]
    return text


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return f"a list of {_type_name(item)}"
    if dataclasses.is_dataclass(hint):
        return "a table"
    return {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}.get(
        hint, str(hint)
    )


def _coerce(where: str, value: Any, hint: Any, *, secret: bool = False) -> Any:
    shown = "***" if secret else repr(value)  # a mistyped password must not reach the message
    bad = ConfigError(f"{where} = {shown} must be {_type_name(hint)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            out = []
            for i, v in enumerate(value):
                if not isinstance(v, dict):
                    # Not the value: an entry of [[proxy.credentials]] may hold a password.
                    raise ConfigError(f"{where}[{i}] must be a table, not {type(v).__name__}")
                out.append(_build(typing.cast(type, item), v, f"{where}[{i}]"))
            return out
        return [_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if isinstance(hint, types.UnionType):  # pragma: no cover - no union keys yet
        return value
    raise bad


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in table:
        if key not in fields:
            raise ConfigError(f"unknown key {where}.{key}; valid keys: " + ", ".join(fields))
    values = {}
    for key, value in table.items():
        label = f"{where}.{key}"
        secret = bool(fields[key].metadata.get("secret"))
        coerced = _coerce(label, value, hints[key], secret=secret)
        check = fields[key].metadata.get("check")
        if check is not None:
            why = check(coerced)
            if why:
                shown = "***" if secret else repr(value)
                raise ConfigError(f"{label} = {shown} {why}")
        values[key] = coerced
    # Required keys of array-of-table entries (routes, registries): "" defaults fail their check.
    for key, f in fields.items():
        if key not in values and f.metadata.get("check") is not None and f.default == "":
            why = f.metadata["check"]("")
            if why:
                raise ConfigError(f"{where}.{key} is required: it {why}")
    return cls(**values)


def _cross_check(c: Config) -> None:
    names = [r.name for r in c.proxy.routes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"proxy.routes: route names must be unique; repeated: {', '.join(dupes)}")
    reserved = {"v2", "mirror", "b"}
    clash = sorted(set(names) & reserved)
    if clash:
        raise ConfigError(f"proxy.routes: names {', '.join(clash)} are reserved by the proxy")
    for i, route in enumerate(c.proxy.routes):
        if route.builds and not (route.children and route.access == "push"):
            raise ConfigError(
                f"proxy.routes[{i}] ({route.name}): builds names who may write from the "
                'sandbox, so it needs access = "push" and children = true; set both or '
                "remove builds"
            )
    for i, r in enumerate(c.proxy.registries):
        if not r.host:
            raise ConfigError(f"proxy.registries[{i}].host is required")
        if r.http and r.insecure:
            raise ConfigError(
                f"proxy.registries[{i}]: http and insecure are exclusive (http is plain HTTP; "
                "insecure is HTTPS without verification)"
            )
    for i, cred in enumerate(c.proxy.credentials):
        if not cred.host:
            raise ConfigError(f"proxy.credentials[{i}].host is required")


def describe() -> list[tuple[str, str, str]]:
    """(key, default, help) for every key: the README's config reference is generated from this."""
    rows: list[tuple[str, str, str]] = []
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = f.default
            rows.append(
                (f"{section}.{f.name}", json.dumps(_dump(default, True)), f.metadata["help"])
            )
    return rows
