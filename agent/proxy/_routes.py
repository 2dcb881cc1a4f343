"""Which upstream repository a proxy path names, and what may be done through it.

Three kinds of route share the ``/v2/`` namespace (docs/proxy.md draws them):

- ``static``  ``/v2/<name>/<sub>/...``          -> ``<upstream>/<sub>``, pull or push (config)
- ``build``   ``/v2/b/<registry>/<repo>/...``    -> that repository, only for a running build's
  capability sent as the Basic credential; writes pinned to a tag
- ``mirror``  ``/v2/<repo>/...?ns=<host>`` (what buildkitd.toml asks for), ``/v2/mirror/<mname>/
  <repo>/...``, or BuildKit v0.11's form of the latter, ``/mirror/<mname>/v2/<repo>/...``
  (:func:`api_path`) -> read-only pulls

Anything else resolves to None (404). Paths are matched on the raw, undecoded path: a
percent-escape is never needed by the distribution API and is refused before we get here.
"""

from __future__ import annotations

import functools
import re
import secrets
import threading
from dataclasses import dataclass

from agent.config import ProxyConfig
from agent.contracts import BuildRoute, Mirror, ProxyLogin, RouteTarget
from agent.errors import ConfigError
from agent.reference import (
    DOCKER_HUB,
    canonical_host,
    is_digest,
    is_repository,
    is_tag,
    split_repository,
)

BUILD_SEGMENT = "b"
MIRROR_SEGMENT = "mirror"
_READ = frozenset({"GET", "HEAD"})
# <name>/<endpoint>: the endpoint is matched at the end so a repository may hold any component.
_OCI_PATH = re.compile(
    r"(?P<name>.+?)/(?P<ep>manifests|blobs/uploads|blobs|tags|referrers)(?:/(?P<ref>[^/]*))?"
)
LOGIN_USER = "build-agent"


@dataclass(frozen=True)
class Target:
    """An upstream repository and the rules for reaching it through one route."""

    kind: str  # static | build | mirror (metric label)
    registry: str  # canonical host
    repository: str
    writable: bool
    pinned_tags: frozenset[str] | None = None  # manifest writes go only to these tags


@dataclass(frozen=True)
class Resolved:
    """A request path taken apart: ``/v2/<name>/<endpoint>/<ref>`` and where it goes."""

    name: str  # the repository as the client wrote it (for Location rewrites)
    endpoint: str  # manifests | blobs | blobs/uploads | tags | referrers
    ref: str  # tag, digest, upload id, "list" or ""
    target: Target


@functools.lru_cache(maxsize=4096)
def split_oci_path(path: str) -> tuple[str, str, str] | None:
    """``name/endpoint/ref`` of a path below ``/v2/`` or None when it is no API path."""
    m = _OCI_PATH.fullmatch(path)
    if m is None:
        return None
    name, ep, ref = m["name"], m["ep"], m["ref"]
    if ref is None:
        return None
    if ep == "manifests" and not (is_tag(ref) or is_digest(ref)):
        return None
    if ep in ("blobs", "referrers") and not is_digest(ref):
        return None
    if ep == "tags" and ref != "list":
        return None
    if ep == "blobs/uploads" and ref and not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", ref):
        return None
    if not is_repository(name):
        return None
    return name, ep, ref


def api_path(raw_path: str) -> str:
    """``raw_path`` with BuildKit v0.11's form of a mirror with a path turned into the API form.

    v0.11 (containerd 1.6) puts a mirror's whole string in the URL's host and ``/v2`` after it, so
    ``mirrors = ["localhost:8080/mirror/quay.io"]`` asks ``/mirror/quay.io/v2/<repo>/...``;
    v0.12 and later ask ``/v2/mirror/quay.io/<repo>/...``. Anything else is returned unchanged."""
    prefix = f"/{MIRROR_SEGMENT}/"
    if not raw_path.startswith(prefix):
        return raw_path
    mname, sep, rest = raw_path[len(prefix) :].partition("/v2")
    if not sep or not mname or "/" in mname:
        return raw_path
    if rest in ("", "/"):
        return "/v2/"
    if not rest.startswith("/"):
        return raw_path
    return f"/v2/{MIRROR_SEGMENT}/{mname}{rest}"


def mirror_name(host: str) -> str:
    """A repository-path-safe name for ``host`` (a path component cannot hold ``:``)."""
    return canonical_host(host).replace(":", "-")


def build_name(repo: str) -> str:
    """The proxy-side name of upstream ``repo`` on a build route: ``b/<registry>/<path>``. It is
    the same for every build, so what a tool learnt about blob locations last time stays true."""
    host, path = split_repository(repo)
    return f"{BUILD_SEGMENT}/{mirror_name(host)}/{path}"


def _build_targets(*targets: RouteTarget | None) -> dict[str, Target]:
    """name -> Target for one build route (base, target, cache). Targets naming one repository
    merge: writable when one is, writes pinned to the union of the writable ones' tags (the
    registry cache may live in the base repository under a tag of its own)."""
    out: dict[str, Target] = {}
    for rt in targets:
        if rt is None:
            continue
        host, path = split_repository(rt.repo)
        pinned = frozenset([rt.tag]) if rt.push and rt.tag else None
        t = Target("build", host, path, writable=rt.push, pinned_tags=pinned)
        name = build_name(rt.repo)
        have = out.get(name)
        if have is not None and have.writable:
            if not t.writable:
                continue
            if have.pinned_tags is None or t.pinned_tags is None:
                pinned = None
            else:
                pinned = have.pinned_tags | t.pinned_tags
            t = Target("build", host, path, writable=True, pinned_tags=pinned)
        out[name] = t
    return out


class Router:
    """The route table. Build routes change at run time (from the build manager's task and the
    proxy's request handlers, all on one loop; a lock keeps it safe if a thread joins in)."""

    def __init__(self, config: ProxyConfig) -> None:
        self._static: dict[str, Target] = {}
        for r in config.routes:
            host, path = split_repository(r.upstream)
            self._static[r.name] = Target("static", host, path, writable=r.access == "push")
        self._mirrors: dict[str, str] = {}  # mirror name -> canonical host
        hosts = [canonical_host(r.host) for r in config.registries if r.mirror]
        names = [r.name or mirror_name(r.host) for r in config.registries if r.mirror]
        if DOCKER_HUB not in hosts:
            hosts.append(DOCKER_HUB)
            names.append(DOCKER_HUB)
        for name, host in zip(names, hosts, strict=True):
            if not is_repository(name) or "/" in name:
                raise ConfigError(
                    f"proxy.registries: mirror name {name!r} must be one path component of "
                    "a-z, 0-9, '.', '_', '-'"
                )
            self._mirrors[name] = host
        self._by_host = {h: n for n, h in self._mirrors.items()}
        self._builds: dict[str, dict[str, Target]] = {}  # capability -> name -> target
        self._lock = threading.Lock()

    # --- build routes -------------------------------------------------------------------------

    def add_build(
        self,
        child_address: str,
        base: RouteTarget | None,
        target: RouteTarget,
        cache: RouteTarget | None = None,
    ) -> BuildRoute:
        cap = secrets.token_hex(16)
        names = _build_targets(base, target, cache)
        with self._lock:
            self._builds[cap] = names
        return BuildRoute(
            base=f"{child_address}/{build_name(base.repo)}" if base is not None else None,
            target=f"{child_address}/{build_name(target.repo)}",
            login=ProxyLogin(child_address, LOGIN_USER, cap),
            cache=f"{child_address}/{build_name(cache.repo)}" if cache is not None else None,
        )

    def remove_build(self, route: BuildRoute) -> None:
        if route.login is not None:
            with self._lock:
                self._builds.pop(route.login.password, None)

    def is_build(self, cap: str | None) -> bool:
        """Whether ``cap`` is the capability of a build route in use now."""
        return cap is not None and cap in self._builds

    def pushes_of(self, cap: str | None) -> tuple[str, ...]:
        """``registry/repository`` of every writable target of the live build route ``cap``."""
        names = self._builds.get(cap) if cap is not None else None
        if names is None:
            return ()
        return tuple(f"{t.registry}/{t.repository}" for t in names.values() if t.writable)

    @property
    def build_count(self) -> int:
        return len(self._builds)

    # --- lookups ------------------------------------------------------------------------------

    def mirrors(self) -> list[Mirror]:
        return [Mirror(host=h, prefix=f"{MIRROR_SEGMENT}/{n}") for n, h in self._mirrors.items()]

    def target_of(self, name: str, ns: str | None = None, cap: str | None = None) -> Target | None:
        """The upstream repository the proxy-side repository ``name`` maps to, if any. A build
        name (``b/...``) maps only for the capability ``cap`` of a build route that holds it.

        A ``mirror/<mname>/`` path wins over ``ns``: BuildKit given a mirror with a path sends
        both (``/v2/mirror/docker.io/library/x/...?ns=docker.io``)."""
        first, _, rest = name.partition("/")
        if first == MIRROR_SEGMENT:
            mname, _, repo = rest.partition("/")
            mhost = self._mirrors.get(mname)
            if mhost is not None and repo:
                if mhost == DOCKER_HUB and "/" not in repo:
                    repo = f"library/{repo}"
                return Target("mirror", mhost, repo, writable=False)
        if ns is not None:
            host = canonical_host(ns)
            if host not in self._by_host:
                return None
            repo = name
            if host == DOCKER_HUB and "/" not in repo:
                repo = f"library/{repo}"
            return Target("mirror", host, repo, writable=False)
        if first == BUILD_SEGMENT:
            names = self._builds.get(cap) if cap is not None else None
            return names.get(name) if names is not None else None
        if first == MIRROR_SEGMENT:
            return None
        static = self._static.get(first)
        if static is None:
            return None
        repo = f"{static.repository}/{rest}" if rest else static.repository
        return Target("static", static.registry, repo, writable=static.writable)

    def resolve(self, path: str, ns: str | None, cap: str | None = None) -> Resolved | None:
        """``path`` is below ``/v2/`` (no leading slash)."""
        parts = split_oci_path(path)
        if parts is None:
            return None
        name, ep, ref = parts
        target = self.target_of(name, ns, cap)
        if target is None:
            return None
        return Resolved(name=name, endpoint=ep, ref=ref, target=target)


def denial(res: Resolved, method: str) -> str | None:
    """Why ``method`` on ``res`` is refused, or None when it is allowed."""
    t = res.target
    if method in _READ:
        return None
    if not t.writable:
        return f"{t.kind} route is read-only"
    if res.endpoint == "manifests":
        if method not in ("PUT", "DELETE"):
            return f"{method} is not allowed on manifests"
        # A digest PUT is content-addressed (an index's children), not a write to another tag.
        if (
            t.pinned_tags is None
            or res.ref in t.pinned_tags
            or (method == "PUT" and is_digest(res.ref))
        ):
            return None
        return "manifest writes through this route are pinned to its tag"
    if res.endpoint == "blobs/uploads" and method in ("POST", "PATCH", "PUT", "DELETE"):
        return None
    if res.endpoint == "blobs" and method == "DELETE" and t.kind != "build":
        return None
    return f"{method} is not allowed on {res.endpoint}"
