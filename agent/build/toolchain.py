"""The toolchain interface: one way to build a Dockerfile and copy an image, two implementations
(agent/build/buildah.py, agent/build/buildkit.py), picked by ``build.toolchain``.

All registry traffic of a toolchain goes through the proxy: ``push_ref``, ``src`` and ``dst`` name
repositories on the proxy's child address (plain HTTP, no credentials). A toolchain never sees a
credential, and its children run through ``agent.build.child`` (scrubbed environment, own process
group, sandbox wrapping, killed as a tree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from agent.build.storage import StorageReport
from agent.contracts import CgroupPort, Mirror, ProxyLogin


class LogSink(Protocol):
    """Where a child's output goes: one call per line, without the trailing newline."""

    def line(self, text: str) -> None: ...


@dataclass(frozen=True)
class BuildSpec:
    """One Dockerfile build.

    ``context_fd`` is an open directory fd owned by the caller (the flow): the daemon's copy of
    the caller's context (flow.Flow._stage), never the caller's own directory, because tools
    resolve ``/dev/fd/<n>`` to a path and a caller's path means nothing in the daemon's mount
    namespace. A toolchain passes it to its child with ``pass_fds`` and names it ``/dev/fd/<n>``.
    """

    context_fd: int
    dockerfile: str  # relative to the context, already checked not to escape it
    push_ref: str  # e.g. "localhost:8080/b/<cap>/base:<key>", on the proxy
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None  # stage
    platform: str | None = None
    no_cache: bool = False
    mirrors: tuple[Mirror, ...] = ()  # FROM-line registries served by the proxy
    proxy_address: str = ""  # "localhost:<port>" as the child sees the proxy
    login: ProxyLogin | None = None  # the push route's credential; never on an argv
    # BuildKit's registry cache on the build's own route (``<proxy>/b/<registry>/<repo>:<tag>``),
    # exported to and imported from; None when build.cache_repo is unset.
    cache_ref: str | None = None
    # The build's cgroup (its memory, process and CPU limits): every child joins it, and RUN
    # steps' containers go under it. None where the node has no usable cgroups.
    cgroup: CgroupPort | None = None
    # (id, fd) of each build secret: a sealed memfd owned by the caller (agent.build.secretfds),
    # passed like context_fd and named /dev/fd/<fd>; the value is never on an argv or in an env.
    secrets: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class BuildOutput:
    digest: str | None  # manifest digest of the pushed image, when the tool reports it


class Toolchain(Protocol):
    name: str  # "buildkit" | "buildah"
    # The upstream repository of the layer cache the builder shares with other nodes
    # (build.cache_repo, BuildKit only), or None: the flow puts it on the build's route.
    cache_repo: str | None
    # Whether RUN steps run inside the build's own cgroup (buildah), so that the build's output
    # may tell which of its limits it hit; BuildKit's run in a node-wide one of their own.
    steps_in_build_cgroup: bool

    @property
    def state(self) -> str:
        """For info and metrics, e.g. "ready", or the supervisor state of buildkitd."""
        ...

    @property
    def storage(self) -> StorageReport:
        """Its local storage: driver, size, budget (build.storage_max), bytes reclaimed."""
        ...

    def after_build(self, *, failed: bool, disk_full: bool = False) -> None:
        """A build ended: keep the storage under its budget, in the background (``close``
        waits for it). ``failed``: it failed, was cancelled or timed out; ``disk_full``: it ran
        out of disk and the disk is still low, so reclaim now (buildah: new builds wait for it;
        BuildKit: the prune runs at once)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def build(self, spec: BuildSpec, log: LogSink) -> BuildOutput:
        """Build and push. Raises BuildFailed (message: failing line/command, exit code, log
        tail), UpstreamUnauthorized/UpstreamUnavailable (registry refused / unreachable).
        Cancellation (asyncio.CancelledError) kills the child tree before propagating."""
        ...

    async def copy(
        self,
        src: str,
        dst: str,
        log: LogSink,
        login: ProxyLogin | None = None,
        cgroup: CgroupPort | None = None,
    ) -> str | None:
        """Copy image ``src`` to ``dst`` (both on the proxy, both reached with ``login``),
        mounting blobs across repos when the registry allows. Returns the digest when known."""
        ...
