"""Build records on disk: ``<state_dir>/builds/<id>.json`` beside the log ``<id>.log``.

A record is rewritten whole on every transition, atomically (temp file, fsync, rename, fsync of
the directory), so a crash leaves either the old or the new record, never half of one. On start
the store loads every record, marks those a dead daemon left ``queued`` or ``running`` as
``interrupted``, and prunes finished ones by age and count (``build.retention_days``,
``build.retention_count``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from agent.errors import IllegalTransition, NotFound

log = logging.getLogger("agent.build")

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
TIMED_OUT = "timed_out"
INTERRUPTED = "interrupted"

FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, INTERRUPTED})
_MOVES: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, TIMED_OUT, INTERRUPTED}),
    RUNNING: FINAL,
}


def new_id() -> str:
    """Sortable by creation time, unguessable enough not to collide: 20261122-030743-3f9a1c."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _valid_id(build_id: str) -> bool:
    return (
        0 < len(build_id) <= 64
        and all(c.isalnum() or c in "-_" for c in build_id)
        and not build_id.startswith("-")
    )


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old or the new content,
    never a mix. ``durable`` also fsyncs the directory, so the rename itself survives power
    loss."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk must not also leave a temp file
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if not durable:
        return
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class RecordStore:
    """Every build record, in memory and on disk. Single-threaded: used from the event loop."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir) / "builds"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._records: dict[str, dict[str, Any]] = {}

    # --- paths ----------------------------------------------------------------------------------

    def log_path(self, build_id: str) -> Path:
        if not _valid_id(build_id):
            raise NotFound(f"no build {build_id!r}")
        return self.dir / f"{build_id}.log"

    def _path(self, build_id: str) -> Path:
        return self.dir / f"{build_id}.json"

    def entries_path(self, build_id: str) -> Path:
        if not _valid_id(build_id):
            raise NotFound(f"no build {build_id!r}")
        return self.dir / f"{build_id}.inputs"

    # --- key inputs (agent/build/keyinputs.py) --------------------------------------------------

    def save_entries(self, build_id: str, blob: bytes) -> None:
        """The per-entry summary of a build's context, beside its record (read only by
        explain/diff, so the record itself stays small). A failure to write it is logged: the
        build goes on, explain then lists no paths."""
        # Not fsynced (a build's cache-hit path should not wait for the disk): a crash may
        # leave a truncated summary, which explain reads as none.
        path = self.entries_path(build_id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            os.rename(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("build %s: cannot write its key inputs: %s", build_id, exc)

    def load_entries(self, build_id: str) -> bytes | None:
        """None for a build without a summary (older versions, a write that failed)."""
        try:
            return self.entries_path(build_id).read_bytes()
        except FileNotFoundError:
            return None

    # --- lifecycle ------------------------------------------------------------------------------

    def load(self) -> list[str]:
        """Read every record; mark unfinished ones interrupted. Returns the ids so marked."""
        interrupted = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = json.loads(path.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("build record %s unreadable (%s); moved aside", path.name, exc)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".json.bad"))
                continue
            if not isinstance(record, dict) or record.get("id") != path.stem:
                log.warning("build record %s is not a record; ignored", path.name)
                continue
            self._records[path.stem] = record
            if record.get("state") not in FINAL:
                self.transition(
                    record,
                    INTERRUPTED,
                    error={
                        "code": "internal",
                        "message": "the daemon stopped while this build was "
                        f"{record.get('state')}; run the build again",
                        "details": {},
                    },
                )
                interrupted.append(path.stem)
        for tmp in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        return interrupted

    def create(self, record: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        record.setdefault("created", now)
        record["state"] = QUEUED
        record["transitions"] = [{"state": QUEUED, "at": now}]
        self.save(record)  # first: a record that cannot be written is not known either
        self._records[record["id"]] = record
        return record

    def transition(self, record: dict[str, Any], state: str, **fields: Any) -> None:
        current = record["state"]
        if state not in _MOVES.get(current, frozenset()):
            raise IllegalTransition(f"build {record['id']}: {current} -> {state} is not allowed")
        now = time.time()
        record["state"] = state
        record.setdefault("transitions", []).append({"state": state, "at": now})
        if state == RUNNING:
            record["started"] = now
        if state in FINAL:
            record["finished"] = now
        record.update(fields)
        self.save(record)

    def save(self, record: dict[str, Any]) -> None:
        data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        # A lost rename of a queued/running record (power loss) reads back as the previous
        # state, which the next start marks interrupted anyway: only final states pay for the
        # directory fsync.
        atomic_write(self._path(record["id"]), data, durable=record["state"] in FINAL)

    # --- queries --------------------------------------------------------------------------------

    def get(self, build_id: str) -> dict[str, Any]:
        record = self._records.get(build_id)
        if record is None:
            raise NotFound(f"no build {build_id!r}; 'agentctl ls' lists the known builds")
        return record

    def all(self) -> list[dict[str, Any]]:
        return sorted(self._records.values(), key=lambda r: (r.get("created", 0), r["id"]))

    # --- retention ------------------------------------------------------------------------------

    def prune(self, *, max_age: float, max_count: int, now: float | None = None) -> list[str]:
        """Drop finished records (and their logs) older than ``max_age`` seconds, then the oldest
        beyond ``max_count``. Unfinished builds are never pruned."""
        now = time.time() if now is None else now
        finished = [r for r in self.all() if r.get("state") in FINAL]
        doomed = [r for r in finished if now - r.get("finished", r.get("created", now)) > max_age]
        rest = [r for r in finished if r not in doomed]
        if len(rest) > max_count:
            doomed += rest[: len(rest) - max_count]
        for r in doomed:
            self._records.pop(r["id"], None)
            for path in (
                self._path(r["id"]),
                self.dir / f"{r['id']}.log",
                self.dir / f"{r['id']}.inputs",
            ):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if doomed:
            log.info("pruned %d finished build records", len(doomed))
        return [r["id"] for r in doomed]


__all__ = [
    "CANCELLED",
    "FAILED",
    "FINAL",
    "INTERRUPTED",
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "TIMED_OUT",
    "RecordStore",
    "atomic_write",
    "new_id",
]
