"""Typed, frozen configuration, read from TOML and ``AGENT_<SECTION>_<KEY>`` variables.

Every key is declared once, as a dataclass field whose metadata holds its help text and validator.
Loading goes: TOML file (optional) -> environment overrides -> type coercion -> per-field
validation -> cross-field checks. Any problem raises :class:`ConfigError` naming the key, the value
and what would be valid; only the entry point turns that into an exit code. The validators are
in agent/_config_checks.py, the type coercion of TOML and environment values in
agent/_config_values.py; the sections, the loading order and the cross-field checks are here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import _config_checks as valid
from agent._config_values import build_section, from_env
from agent.errors import ConfigError

DEFAULT_PATH = Path("/etc/build-agent/config.toml")
ENV_PREFIX = "AGENT_"


def _key(default: Any, help: str, check: valid.Check | None = None, *, secret: bool = False) -> Any:
    meta = {"help": help, "check": check, "secret": secret}
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata=meta)
    return field(default=default, metadata=meta)


# --- sections -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = _key(
        "/run/build-agent/agent.sock",
        "control socket path (ignored under socket activation)",
        valid.absolute,
    )
    socket_group: str = _key(
        "build-agent", 'group owning the 0660 socket ("" keeps the daemon\'s group)'
    )
    state_dir: str = _key(
        "/var/lib/build-agent", "records, logs and toolchain storage", valid.absolute
    )
    runtime_dir: str = _key(
        "/run/build-agent", "runtime files (pid files, generated configs)", valid.absolute
    )
    metrics_address: str = _key(
        "127.0.0.1:9500", 'HOST:PORT of /metrics; "" turns metrics off', valid.metrics_address
    )
    allowed_uids: list[int] = _key(
        [0], "uids that may build, and read and cancel their own builds", valid.ids
    )
    allowed_gids: list[int] = _key(
        [], "gids that may build, and read and cancel their own builds", valid.ids
    )
    read_uids: list[int] = _key(
        [], "uids that may read every build (status, list, logs), resolve and info", valid.ids
    )
    read_gids: list[int] = _key([], "gids that may read every build, resolve and info", valid.ids)
    shutdown_grace: float = _key(
        30.0, "seconds running builds get to finish at shutdown", valid.non_negative
    )
    max_frame: int = _key(1 << 20, "largest control frame in bytes", valid.positive)
    log_level: str = _key(
        "info", "debug | info | warning | error", valid.one_of("debug", "info", "warning", "error")
    )
    log_format: str = _key(
        "auto", "auto (json off a TTY) | json | text", valid.one_of("auto", "json", "text")
    )


@dataclass(frozen=True)
class BuildConfig:
    toolchain: str = _key(
        "auto", "auto | buildkit | buildah", valid.one_of("auto", "buildkit", "buildah")
    )
    max_concurrent_builds: int = _key(2, "builds running at once", valid.positive)
    max_queued: int = _key(
        100, "builds waiting beyond the running ones; more get 'busy'", valid.non_negative
    )
    timeout: float = _key(3600.0, "default build timeout in seconds", valid.positive)
    base_repo: str = _key("", "repository where built base images go", valid.repo_or_empty)
    docker_config: str = _key(
        "/etc/build-agent/docker-config.json", "registry credentials (read by the proxy alone)"
    )
    retention_days: float = _key(
        14.0, "records and logs older than this are pruned", valid.positive
    )
    retention_count: int = _key(1000, "at most this many finished records are kept", valid.positive)
    resolve_ttl: float = _key(60.0, "seconds a resolved ref stays cached", valid.non_negative)
    prefetch_refs: list[str] = _key([], "refs resolved periodically so lookups are warm")
    prefetch_interval: float = _key(300.0, "seconds between prefetch rounds", valid.positive)
    from_max_age: float = _key(
        0.0,
        "seconds a cached digest of a FROM image may be old to go into a content key (0: ask "
        "the registry on every build; at most build.resolve_ttl)",
        valid.non_negative,
    )
    cache_repo: str = _key(
        "", "BuildKit registry cache repository (buildkit toolchain only)", valid.repo_or_empty
    )
    log_tail_lines: int = _key(20, "log lines quoted in a failed build's error", valid.positive)
    memory_max: str = _key(
        "4GiB",
        'memory of one build\'s processes together (bytes or e.g. 512MiB, 4GiB; "0": no '
        "limit); a request may ask for less",
        valid.size,
    )
    pids_max: int = _key(
        2048,
        "processes of one build at once (0: no limit); a request may ask for less",
        valid.non_negative,
    )
    cpu_max: float = _key(
        0.0,
        "CPUs one build may use, fractional (0: no limit); a request may ask for less",
        valid.non_negative,
    )
    storage_max: str = _key(
        "20GiB",
        "disk the toolchain's local storage may keep (buildah's image store, BuildKit's cache; "
        'bytes or e.g. 20GiB; "0": no budget): pruned back under it, least recently used first',
        valid.size,
    )
    buildah_driver: str = _key(
        "auto",
        "buildah's storage driver: auto (overlay where a native overlay mount works, else vfs), "
        "overlay, vfs",
        valid.one_of("auto", "overlay", "vfs"),
    )


@dataclass(frozen=True)
class RouteConfig:
    name: str = _key("", "route name: /v2/<name>/... on the proxy", valid.name)
    upstream: str = _key(
        "", "upstream repository prefix, e.g. registry.example.com/team/images", valid.repository
    )
    access: str = _key("pull", "push | pull", valid.one_of("push", "pull"))
    children: bool = _key(
        False, "serve the route to build children (in the sandbox), read-only unless builds"
    )
    builds: list[str] = _key(
        [],
        "repositories whose builds (their push targets) may also write through it from the "
        "sandbox, with their build login",
        valid.repositories,
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
        8080, "port of the proxy inside the sandbox: children use localhost:<port>", valid.port
    )
    host_address: str = _key(
        "127.0.0.1:8079",
        'host-side listener for operators, token required (port 0: any free port; "": off)',
        valid.host_listener,
    )
    host_token_file: str = _key(
        "",
        'file (0600) holding the host listener\'s token; "": the daemon makes one at '
        "<runtime_dir>/proxy-host.token",
        valid.absolute_or_empty,
    )
    routes: list[RouteConfig] = _key([], "static routes ([[proxy.routes]])")
    registries: list[RegistryConfig] = _key(
        [], "per-upstream transport settings ([[proxy.registries]])"
    )
    credentials: list[CredentialConfig] = _key([], "inline credentials ([[proxy.credentials]])")
    token_ttl: float = _key(
        60.0, "bearer token lifetime when the token server gives none", valid.positive
    )
    helper_timeout: float = _key(
        10.0, "seconds a docker-credential helper may take", valid.positive
    )
    retries: int = _key(4, "attempts for retryable upstream requests", valid.positive)
    retry_max_backoff: float = _key(5.0, "cap of the retry backoff in seconds", valid.positive)
    connect_timeout: float = _key(10.0, "upstream connect timeout in seconds", valid.positive)


@dataclass(frozen=True)
class SandboxConfig:
    mode: str = _key(
        "on", "on | off (off is reported loudly by info and the logs)", valid.one_of("on", "off")
    )
    netns: str = _key("build-agent", "name of the children's network namespace", valid.name)
    egress: str = _key("none", "none | nat", valid.one_of("none", "nat"))
    nat_subnet: str = _key("10.203.0.0/30", "veth addresses for egress = nat", valid.subnet)


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
        sections[name] = build_section(cls, table, name)
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
        raw.setdefault(section, {})[key] = from_env(var, text, _hint(cls, key))


def _hint(cls: type, key: str) -> Any:
    return typing.get_type_hints(cls)[key]


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
