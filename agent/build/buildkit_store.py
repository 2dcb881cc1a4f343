"""BuildKit's storage under ``<state_dir>/buildkit``, kept under ``build.storage_max``.

buildkitd keeps the budget itself: buildkitd.toml gets ``gc = true`` and ``gckeepstorage`` (read
by v0.11 as bytes, by v0.24 as its reserved space), and it collects after builds. What its
collector misses is a RUN step's snapshot when the build failed, was cancelled or timed out: it is
no cache record (``buildctl du`` does not list it), yet it stays on disk. Measured with both real
versions: a step that wrote 300 MB and was cancelled left 318 MB in the root; ``buildctl prune
--keep-storage <budget>`` freed it and kept every cache record. So after such a build, and
whenever the root is over the budget, the toolchain runs that prune.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.build.storage import StorageReport, Upkeep, measure

log = logging.getLogger("agent.build.buildkit")

# The root is measured at most this often after good builds (a walk of a big cache costs CPU);
# always after a prune.
MEASURE_EVERY = 30.0
NO_BUDGET_MB = 10**9  # a petabyte: "keep everything"


class BuildkitStore:
    def __init__(
        self, root: Path, *, max_bytes: int, prune: Callable[[int], Awaitable[int]]
    ) -> None:
        """``prune(keep_mb)`` runs ``buildctl prune --keep-storage keep_mb``; returns its exit."""
        self.report = StorageReport(driver="buildkitd", paths=(root,), max_bytes=max_bytes)
        self._prune = prune
        self._measured = 0.0
        self._needs_prune = False
        self._later: asyncio.TimerHandle | None = None
        self._upkeep = Upkeep("BuildKit storage upkeep", self._run)

    def keep_bytes(self) -> int:
        """What buildkitd.toml's ``gckeepstorage`` says: the budget with some room."""
        return self.report.target() if self.report.max_bytes else 0

    async def start(self) -> None:
        await self._measure()

    def after_build(self, *, failed: bool, disk_full: bool = False) -> None:
        self._needs_prune = self._needs_prune or failed or disk_full
        if failed or disk_full or time.monotonic() - self._measured >= MEASURE_EVERY:
            self._upkeep.request(urgent=disk_full)
        elif self._later is None:  # measured a moment ago: once more when the burst is over
            self._later = asyncio.get_running_loop().call_later(MEASURE_EVERY, self._measure_later)

    def _measure_later(self) -> None:
        self._later = None
        self._upkeep.request()

    async def wait(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        await self._upkeep.wait()

    async def _measure(self) -> int:
        self.report.used_bytes = await asyncio.to_thread(measure, self.report.paths)
        self._measured = time.monotonic()
        return self.report.used_bytes

    async def _run(self, urgent: bool) -> None:
        before = await self._measure()
        if not (self._needs_prune or urgent or self.report.over()):
            return
        self._needs_prune = False
        # Without a budget, keep every record (a prune still frees what no record holds).
        keep_mb = self.keep_bytes() // 1_000_000 if self.report.max_bytes else NO_BUDGET_MB
        code = await self._prune(keep_mb)
        if code != 0:
            self._needs_prune = True  # buildkitd restarting, say: the next upkeep tries again
        after = await self._measure()
        self.report.reclaimed_bytes += max(0, before - after)
        log.info(
            "BuildKit storage pruned (exit %d): %d -> %d bytes (budget %d)",
            code,
            before,
            after,
            self.report.max_bytes,
        )
