"""Contracts between the daemon's components, so each can be built and tested on its own.

The build manager talks to the registry proxy through :class:`RegistryPort` and starts children
through :class:`SandboxPort`; the daemon wires the real implementations together (agent/daemon.py).
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RouteTarget:
    """One repository a build route maps to. ``tag`` pins manifest writes when ``push`` is set."""

    repo: str  # upstream repository, e.g. "registry.example.com/team/images"
    tag: str | None = None
    push: bool = False


@dataclass(frozen=True)
class ProxyLogin:
    """The Basic credential a child presents to the proxy for a build route (docker config
    ``auths`` entry for ``address``). ``password`` is the route's unguessable capability: it must
    never reach an argv, a log, a record or an error (``RegistryPort.scrub`` removes it)."""

    address: str  # the proxy as the child addresses it, e.g. "localhost:8080"
    username: str
    password: str

    def basic(self) -> str:
        """The Basic token: base64 of ``username:password``."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def docker_config(self) -> str:
        """A docker ``config.json`` (also a containers-auth.json) holding only this login."""
        return json.dumps({"auths": {self.address: {"auth": self.basic()}}}) + "\n"


@dataclass(frozen=True)
class BuildRoute:
    """A per-build route: children address ``base`` and ``target`` as repositories on the proxy.

    The names are stable (``<proxy>/b/<registry>/<repository>``), so a tool's knowledge of where
    blobs already are stays true from one build to the next; what makes the route this build's is
    ``login``, the capability the child sends as its Basic credential.
    """

    base: str | None  # e.g. "localhost:8080/b/registry.example.com/team/base", None without one
    target: str  # e.g. "localhost:8080/b/registry.example.com/team/ws"
    login: ProxyLogin | None  # None: the route needs no credential (no proxy in between)
    cache: str | None = None  # BuildKit's registry cache (build.cache_repo), when asked for


@dataclass(frozen=True)
class Mirror:
    """A read-only pull route for FROM lines: ``host``/x is served at
    ``<child_address>/<prefix>/x``."""

    host: str  # upstream registry host[:port] as written in FROM lines, e.g. "docker.io"
    prefix: str  # path on the proxy, e.g. "mirror/docker.io"


class RegistryPort(Protocol):
    """What the build side needs from the registry proxy."""

    @property
    def child_address(self) -> str:
        """``localhost:<port>`` as a child in the sandbox addresses the proxy (plain HTTP)."""
        ...

    @property
    def host_address(self) -> str:
        """``host:port`` of the proxy's host-side listener."""
        ...

    def mirrors(self) -> list[Mirror]: ...

    def add_build_route(
        self, *, base: RouteTarget | None, target: RouteTarget, cache: RouteTarget | None = None
    ) -> BuildRoute: ...

    def remove_build_route(self, route: BuildRoute) -> None: ...

    async def manifest_digest(self, ref: str) -> str | None:
        """Digest of ``ref`` upstream (HEAD with the proxy's credentials); None when it does not
        exist. Raises UpstreamUnauthorized / UpstreamUnavailable / BadRequest (bad ref)."""
        ...

    def scrub(self, text: str) -> str:
        """``text`` with every known credential and capability prefix replaced by '***'."""
        ...


class CgroupPort(Protocol):
    """One build's cgroup (agent/sandbox/_cgroup.py): children join it before they exec, and an
    OCI runtime puts the containers it makes under ``parent``."""

    @property
    def parent(self) -> str: ...

    def join_argv(self, argv: list[str]) -> list[str]: ...


class SandboxPort(Protocol):
    """What the proxy and the toolchains need from the build sandbox."""

    @property
    def mode(self) -> str:
        """ "on" or "off"."""
        ...

    def wrap(
        self, argv: list[str], *, pid_namespace: bool = False, visible: Sequence[str] = ()
    ) -> list[str]:
        """argv that runs ``argv`` inside the sandbox (network + private mount namespace, and a
        PID namespace when asked: agent.sandbox gives every child one, because a RUN step sees
        the /proc of its toolchain's PID namespace). ``visible``: this build's own directories
        under the per-build staging roots (``<state_dir>/contexts``, ``<state_dir>/buildah/tmp``),
        which are hidden from every child except the ones that name them here. With the sandbox
        off it returns ``argv`` unchanged. Exec the result directly from the daemon process (it
        dies with its parent)."""
        ...

    def listen(self, port: int) -> socket.socket:
        """A listening TCP socket on 127.0.0.1:``port`` inside the sandbox's network namespace
        (on the host's loopback when the sandbox is off)."""
        ...

