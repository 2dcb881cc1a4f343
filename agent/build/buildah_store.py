"""buildah's image store under ``<state_dir>/buildah/storage``: its driver, and keeping it under
``build.storage_max``.

- **Driver.** ``overlay`` where a native overlay mount works on the state directory's file system
  (root on ext4 or xfs: layers are shared, not copied), ``vfs`` otherwise (every layer copied
  whole; works everywhere, also inside containers). ``build.buildah_driver`` forces one. Data an
  earlier start left under the other driver is removed at start: it is a cache no build can use.
- **What a build made** (its image, and after a failed or killed bud its working containers) is
  removed once no build uses the store (agent/build/storegate.py says why it must wait).
- **Over the budget**, images are removed least recently used first (an image's use: the last
  build whose ``FROM`` named it, as bud's ``STEP n/m: FROM <ref>`` lines say; an image no build
  of this daemon used counts as oldest) until the store is under 90 % of the budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.build.child import popen
from agent.build.storage import (
    StorageReport,
    Upkeep,
    disk_room,
    free_bytes,
    measure,
    overlay_works,
)
from agent.build.storegate import StoreGate
from agent.errors import StartupError
from agent.limits import format_bytes

log = logging.getLogger("agent.build.buildah")

# "STEP 1/2: FROM ref [AS name]", in a multi-stage build "[1/2] STEP 1/2: FROM ...", flags first.
MAX_PENDING = 16  # removals waiting for a quiet moment before the removal turns urgent
PRUNE_ROUNDS = 4

_FROM = re.compile(r"^(?:\[\d+/\d+\] )?STEP \d+/\d+: FROM (?:--\S+ +)*(\S+)", re.IGNORECASE)


def from_refs(lines: list[str]) -> list[str]:
    """The image references of bud's ``STEP n/m: FROM <ref> [AS name]`` lines."""
    return [m.group(1) for m in map(_FROM.match, lines) if m]


def _names_match(names: list[str], ref: str) -> bool:
    # buildah stores a pulled image under its full name ("host/repo:tag"); a FROM line may
    # leave out the tag (":latest") or, for Docker Hub, the host and "library/".
    want = ref if ":" in ref.rpartition("/")[2] or "@" in ref else f"{ref}:latest"
    return any(n == want or n.endswith("/" + want) for n in names)


class BuildahStore:
    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        driver: str,
        argv: Callable[[], list[str]],
        env: Callable[[], dict[str, str]],
    ) -> None:
        self.dir = root / "storage"
        self._choice = driver  # "auto" | "overlay" | "vfs"
        self._argv = argv
        self._env = env
        self.gate = StoreGate()
        self.report = StorageReport(driver="vfs", paths=(self.dir,), max_bytes=max_bytes)
        self._made: list[str] = []  # images of finished builds, to remove
        self._containers = False  # a bud failed or was killed: it may have left containers
        self._used: dict[str, float] = {}  # FROM ref -> when a build last named it
        self._disk_full = False
        self._upkeep = Upkeep("buildah storage upkeep", self._maintain_once)

    @property
    def driver(self) -> str:
        return self.report.driver

    def start(self) -> None:
        """Choose the driver (blocking: once, at the toolchain's start) and drop the other one's
        leftovers."""
        works, why = overlay_works(self.dir.parent / "tmp")
        if self._choice == "overlay" and not works:
            raise StartupError(
                f"build.buildah_driver is overlay, but a native overlay mount fails on the file "
                f'system of {self.dir}: {why}; use build.buildah_driver = "auto" (vfs there)'
            )
        driver = "overlay" if works and self._choice != "vfs" else "vfs"
        if driver == "vfs" and self._choice == "auto":
            self.report.note = f"native overlay does not mount here ({why}): vfs copies layers"
        self.report.driver = driver
        other = "vfs" if driver == "overlay" else "overlay"
        for stale in self.dir.glob(f"{other}*"):
            log.info(
                "removing %s: storage of the %s driver, which this start does not use", stale, other
            )
            shutil.rmtree(stale, ignore_errors=True)
        self.report.used_bytes = measure(self.report.paths)

    def used(self, lines: list[str]) -> None:
        now = time.time()
        for ref in from_refs(lines):
            self._used[ref] = now

    def made(self, image: str, *, failed: bool) -> None:
        """A build ended: its image (if any) goes, and the store is checked against its budget."""
        self._made.append(image)
        self._containers = self._containers or failed
        if len(self._made) >= MAX_PENDING:  # builds overlap without pause: do not wait forever
            self.gate.escalate()
        self.maintain()

    def maintain(self, *, disk_full: bool = False) -> None:
        """Run the removals in the background (agent.build.storage.Upkeep); after a full disk
        also until the disk has room again, least recently used images first."""
        self._disk_full = self._disk_full or disk_full
        if disk_full:
            self.gate.escalate()
        self._upkeep.request(urgent=disk_full or self.report.over())

    async def wait(self) -> None:
        await self._upkeep.wait()

    async def _maintain_once(self, urgent: bool) -> None:
        # Measuring walks the store: outside the gate, so that builds are not held meanwhile.
        before = await asyncio.to_thread(measure, self.report.paths)
        made, self._made = self._made, []
        containers, self._containers = self._containers, False
        if made or containers:
            async with self.gate.change(urgent=urgent):
                if made:
                    await self._buildah("rmi", "-f", *made)
                if containers:
                    await self._buildah("rm", "--all")
        self.report.used_bytes = await asyncio.to_thread(measure, self.report.paths)
        full, self._disk_full = self._disk_full, False
        if self.report.over() or full:
            async with self.gate.change(urgent=True):
                await self._prune_lru(full)
        self.report.reclaimed_bytes += max(0, before - self.report.used_bytes)
        if self.report.over():
            log.warning(
                "buildah storage is %s, over build.storage_max %s, with every image removed",
                format_bytes(self.report.used_bytes),
                format_bytes(self.report.max_bytes),
            )

    def _enough(self, full: bool) -> bool:
        under = not self.report.max_bytes or self.report.used_bytes <= self.report.target()
        if not full:
            return under
        free, room = free_bytes(self.dir), disk_room(self.dir)
        return under and (free is None or free >= room)

    async def _prune_lru(self, full: bool) -> None:
        """Remove least recently used images until :meth:`_enough`: each round picks as many as
        their listed sizes say it takes, removes them in one ``rmi`` and measures once (shared
        layers make the listed sizes an upper bound, hence rounds)."""
        for _ in range(PRUNE_ROUNDS):
            if self._enough(full):
                return
            images = await self._images()
            images.sort(key=lambda im: (self._last_use(im.names), im.created))
            excess = max(
                self.report.used_bytes - self.report.target() if self.report.max_bytes else 0,
                (disk_room(self.dir) - (free_bytes(self.dir) or 0)) if full else 0,
                1,
            )
            batch, freed = [], 0
            for im in images:
                if freed >= excess:
                    break
                batch.append(im)
                freed += im.size
            if not batch:
                return
            log.info("buildah storage upkeep: removing %s", ", ".join(im.label for im in batch))
            await self._buildah("rmi", "-f", *(im.id for im in batch))
            self.report.used_bytes = await asyncio.to_thread(measure, self.report.paths)

    def _last_use(self, names: list[str]) -> float:
        return max((t for ref, t in self._used.items() if _names_match(names, ref)), default=0.0)

    async def _images(self) -> list[_Image]:
        """Every image in the store (``buildah images --json``)."""
        return parse_images(await self._buildah("images", "--json"))

    async def _buildah(self, *args: str) -> str:
        """Run buildah on the store to its end; its output (stderr too). A failure is logged:
        the next upkeep tries again."""
        child = await popen(f"buildah {args[0]}", [*self._argv(), *args], env=self._env())
        assert child.stdout is not None
        exited = asyncio.ensure_future(child.wait())
        try:
            out = await child.stdout.read()
            code = await exited
        except BaseException:
            await asyncio.shield(child.stop(grace=1.0))
            raise
        text = out.decode(errors="replace")
        if code != 0:
            log.warning("buildah %s exited %d: %s", args[0], code, text.strip()[-300:])
        return text


@dataclass(frozen=True)
class _Image:
    id: str
    names: list[str]
    created: float
    size: int  # as listed (decimal units, rounded): shared layers count in each image

    @property
    def label(self) -> str:
        return self.names[0] if self.names else self.id


_SIZE = re.compile(r"^\s*([\d.]+)\s*([kMGT]?B)\s*$")
_UNIT = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_images(text: str) -> list[_Image]:
    """``buildah images --json``, which may have warning lines around its JSON array."""
    first = re.search(r"^\[", text, re.M)  # the array's own line: a warning has "WARN[0000]"
    start, end = (first.start() if first else -1), text.rfind("]")
    try:
        rows = json.loads(text[start : end + 1]) if 0 <= start < end else []
    except ValueError:
        return []
    out = []
    for row in rows if isinstance(rows, list) else []:
        if not (isinstance(row, dict) and isinstance(row.get("id"), str)):
            continue
        m = _SIZE.match(str(row.get("size") or ""))
        created = row.get("created")
        out.append(
            _Image(
                id=row["id"],
                names=[n for n in row.get("names") or [] if isinstance(n, str)],
                created=float(created) if isinstance(created, int) else 0.0,
                size=int(float(m.group(1)) * _UNIT[m.group(2)]) if m else 0,
            )
        )
    return out
