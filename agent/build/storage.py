"""A toolchain's local storage: how big it is, its budget (build.storage_max), what was reclaimed,
and the tests both toolchains share (is the disk full, does native overlay mount here).

BuildKit keeps its budget with its own garbage collector (a GC policy in buildkitd.toml) plus a
``buildctl prune`` after a build that failed, was cancelled or timed out (a cancelled RUN step's
snapshot is not a cache record: ``buildctl du`` does not show it, GC frees it only some 45 s
later, and not at all where gc is off; a prune frees it at once). buildah has no collector: the
toolchain removes what each build made and, over the budget, the least recently used images
(agent/build/buildah_store.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.limits import format_bytes

log = logging.getLogger("agent.build.storage")

# Prune back to this share of the budget, so that the next build does not prune again at once.
LOW_WATER = 0.9

_FULL = ("no space left on device", "disk quota exceeded")


@dataclass
class StorageReport:
    """What ``info`` and the metrics say of a toolchain's storage, kept current by it."""

    driver: str  # buildah: "overlay" | "vfs"; BuildKit: its snapshotter as configured
    paths: tuple[Path, ...]
    max_bytes: int  # build.storage_max; 0: no budget
    used_bytes: int = 0
    reclaimed_bytes: int = 0  # since the daemon started
    note: str = ""  # why this driver, e.g. "native overlay does not mount here: ..."

    def over(self) -> bool:
        return self.max_bytes > 0 and self.used_bytes > self.max_bytes

    def target(self) -> int:
        """The size a prune aims for: under the budget with some room."""
        return int(self.max_bytes * LOW_WATER)

    def words(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "driver": self.driver,
            "used": format_bytes(self.used_bytes),
            "used_bytes": self.used_bytes,
            "max": format_bytes(self.max_bytes) if self.max_bytes else "no budget",
            "max_bytes": self.max_bytes,
            "reclaimed_bytes": self.reclaimed_bytes,
        }
        if self.note:
            out["note"] = self.note
        return out


class Upkeep:
    """Runs a store's upkeep in the background, one run at a time; asked again while it runs, it
    runs once more after. ``urgent`` is passed on to the run (and sticks until a run got it)."""

    def __init__(self, name: str, run: Callable[[bool], Awaitable[None]]) -> None:
        self._name = name
        self._run = run
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._urgent = False

    def request(self, *, urgent: bool = False) -> None:
        self._urgent = self._urgent or urgent
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self._name)

    async def wait(self) -> None:
        while self._task is not None and not self._task.done():
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            urgent, self._urgent = self._urgent, False
            try:
                await self._run(urgent)
            except Exception:
                log.exception("%s failed; it runs again after the next build", self._name)


def measure(paths: tuple[Path, ...]) -> int:
    """Bytes on disk under ``paths``: allocated blocks, each inode once, not following symlinks
    nor crossing into other file systems (a mounted container root would count twice)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for top in paths:
        try:
            dev = top.lstat().st_dev
        except OSError:
            continue
        stack = [str(top)]
        while stack:
            here = stack.pop()
            try:
                entries = list(os.scandir(here))
            except OSError:
                continue  # removed meanwhile, or unreadable: not ours to count
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != dev or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total


def disk_full(text: str) -> bool:
    """Whether a tool's output says that the disk (or a quota) is full."""
    low = text.lower()
    return any(words in low for words in _FULL)


def full_message(report: StorageReport, free: int | None) -> str:
    where = ", ".join(str(p) for p in report.paths)
    budget = (
        f"build.storage_max is {format_bytes(report.max_bytes)}"
        if report.max_bytes
        else "build.storage_max is not set"
    )
    left = f"; {format_bytes(free)} free now" if free is not None else ""
    return (
        f"the build ran out of disk space (no space left on device) in {where}{left}: the agent "
        f"is reclaiming its storage, so a retry may pass; {budget}: give the state directory "
        "more room or set a smaller budget"
    )


def free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def low_on_disk(report: StorageReport) -> bool:
    """Whether the file system of the store has less free than :func:`disk_room` now."""
    if not report.paths:
        return False
    free = free_bytes(report.paths[0])
    return free is not None and free < disk_room(report.paths[0])


def disk_room(path: Path) -> int:
    """The free space a store's upkeep restores after a full disk: a tenth of the file system,
    at most 1 GiB (0 when it cannot be read)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return min(1 << 30, st.f_blocks * st.f_frsize // 10)


def overlay_works(where: Path) -> tuple[bool, str]:
    """Whether a native overlay mount works on the file system of ``where`` (buildah's overlay
    driver needs it; inside some containers, or on an overlay or NFS upper, it does not)."""
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    probe = Path(tempfile.mkdtemp(prefix="overlay-probe-", dir=where))
    try:
        for d in ("lower", "upper", "work", "merged"):
            (probe / d).mkdir()
        opts = f"lowerdir={probe}/lower,upperdir={probe}/upper,workdir={probe}/work"
        # In a mount namespace of its own, so that nothing of the probe shows in the daemon's.
        res = subprocess.run(
            [
                "unshare",
                "-m",
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                opts,
                str(probe / "merged"),
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if res.returncode == 0:
            return True, ""
        why = (res.stderr or res.stdout).strip().splitlines()
        return False, why[-1] if why else f"mount exited with status {res.returncode}"
    except (OSError, subprocess.SubprocessError) as exc:
        return False, str(exc)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
