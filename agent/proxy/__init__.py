"""The authenticating registry proxy (DESIGN section 3). PLACEHOLDER until the proxy issue lands."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agent.app import App
from agent.ports import RegistryPort, SandboxPort


@asynccontextmanager
async def open_proxy(app: App, sandbox: SandboxPort) -> AsyncIterator[RegistryPort | None]:
    """Start the proxy's listeners (inside the sandbox and on the host) for the daemon's lifetime."""
    yield None


__all__ = ["open_proxy"]
