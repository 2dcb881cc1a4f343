"""The running daemon's state, handed to every op handler as ``ctx.app``.

The component fields are set in one place, ``Daemon._start`` (agent/daemon.py), in start order:
sandbox, proxy, resolver, builds. Each is None until it has started; the control socket opens
last, so a handler sees all of them. Each component reports its own ``state`` (a Literal or an
enum of its module) for ``info``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from agent import __version__
from agent.config import Config

if TYPE_CHECKING:
    from agent.build.manager import BuildManager
    from agent.build.resolve import Resolver
    from agent.build.toolchain import Toolchain
    from agent.proxy import Proxy
    from agent.sandbox import OffSandbox, Sandbox


@dataclass
class App:
    """What the daemon is running: its config, metrics registry and started components."""

    config: Config
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )
    version: str = __version__
    started_wall: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    dev_mode: bool = False
    draining: bool = False
    sandbox: Sandbox | OffSandbox | None = None
    proxy: Proxy | None = None
    resolver: Resolver | None = None
    builds: BuildManager | None = None

    @property
    def toolchain(self) -> Toolchain | None:
        """The builds' toolchain (buildkit or buildah), once the builds have started."""
        return self.builds.toolchain if self.builds is not None else None

    def uptime(self) -> float:
        return time.monotonic() - self.started_mono
