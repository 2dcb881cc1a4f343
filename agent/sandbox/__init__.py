"""The build sandbox (DESIGN section 4). PLACEHOLDER until the sandbox issue lands: only
``mode = "off"`` works."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agent.app import App
from agent.errors import StartupError
from agent.ports import NoSandbox, SandboxPort


@asynccontextmanager
async def open_sandbox(app: App) -> AsyncIterator[SandboxPort]:
    """Create the sandbox for the daemon's lifetime; remove it on exit."""
    if app.config.sandbox.mode == "off":
        yield NoSandbox()
        return
    raise StartupError('sandbox.mode = "on" is not implemented yet; set sandbox.mode = "off"')


__all__ = ["open_sandbox"]
