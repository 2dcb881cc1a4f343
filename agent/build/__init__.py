"""Builds: manager, records, logs, toolchains (DESIGN section 2). PLACEHOLDER until the build
issue lands."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from agent.app import App


@asynccontextmanager
async def open_builds(app: App) -> AsyncIterator[Any]:
    """Start the toolchain and the build manager; on exit, drain within the grace period."""
    yield None


__all__ = ["open_builds"]
