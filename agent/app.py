"""The running daemon's shared state, handed to every op handler as ``ctx.app``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry

from agent import __version__
from agent.config import Config

if TYPE_CHECKING:
    from agent.ports import RegistryPort, SandboxPort


class Component(Protocol):
    """Anything whose state ``info`` reports (e.g. "running", "off", "BACKOFF")."""

    @property
    def state(self) -> str: ...


@dataclass
class App:
    config: Config
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )
    version: str = __version__
    started_wall: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    dev_mode: bool = False
    components: dict[str, Component] = field(default_factory=dict)
    # Filled in by the daemon as components start; None until then (or when not configured).
    proxy: RegistryPort | None = None
    sandbox: SandboxPort | None = None
    builds: Any = None  # agent.build.manager.BuildManager
    toolchain: Any = None  # agent.build.toolchain.Toolchain
    resolver: Any = None  # agent.build.resolve.Resolver
    draining: bool = False

    def uptime(self) -> float:
        return time.monotonic() - self.started_mono
