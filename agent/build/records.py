"""Build records on disk: ``<state_dir>/builds/<id>.json`` beside the log ``<id>.log``.

A record is rewritten whole on every transition, atomically (temp file, fsync, rename, fsync of
the directory), so a crash leaves either the old or the new record, never half of one. On start
the store loads every record, marks those a dead daemon left ``queued`` or ``running`` as
``interrupted``, and prunes finished ones by age and count (``build.retention_days``,
``build.retention_count``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ErrorDict, IllegalTransition, NotFound

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
    # FAILED from QUEUED: a build whose task broke before it could move to running (the
    # manager's last-resort path) fails from where it is, so no caller waits for it forever.
    QUEUED: frozenset({RUNNING, FAILED, CANCELLED, TIMED_OUT, INTERRUPTED}),
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


@dataclass
class Transition:
    """One state change of a record: ``{"state", "at"}`` on disk (``at``: Unix time)."""

    state: str
    at: float


# The record's keys and the JSON types each may hold on disk; a value of another type (a record
# edited by hand, or by a version that meant something else) is dropped when the record is read.
_TYPES: dict[str, type | tuple[type, ...]] = {
    "state": str,
    "created": (int, float),
    "started": (int, float),
    "finished": (int, float),
    "labels": dict,
    "peer": dict,
    "owners": list,
    "toolchain": str,
    "request": dict,
    "context": dict,
    "inputs": dict,
    "limits": dict,
    "callers": int,
    "base_ref": str,
    "target_ref": str,
    "digest": str,
    "base_digest": str,
    "cache": dict,
    "timings": dict,
    "base_miss": list,
    "error": dict,
}


@dataclass(eq=False)  # one record is one build: compared by identity
class BuildRecord:
    """One build: the one shape of a record, in memory and in ``<id>.json``.

    Made by ``build/handlers.py`` (who asked for what), moved by :meth:`move` (the only way the
    state changes: it refuses a move the table forbids), filled in with the outcome by the manager,
    written by :meth:`to_json` and read back by :meth:`from_json`, which also reads what older
    versions wrote (no ``owners``: the submitter owns it). A field that is None is left out of
    the JSON, so a record holds the keys it always held; keys this version does not know are
    kept in ``extra`` and written back as they were."""

    id: str
    state: str = QUEUED
    created: float | None = None  # None only until the store enters it
    transitions: list[Transition] = field(default_factory=list)
    started: float | None = None
    finished: float | None = None
    # What was asked, by whom (build/handlers.py); docs/protocol.md section 7.2 ("status").
    labels: dict[str, str] = field(default_factory=dict)
    peer: dict[str, int] | None = None  # uid, gid, pid of the submitter
    owners: list[int] = field(default_factory=list)  # submitter first, then joiners
    toolchain: str | None = None
    request: dict[str, Any] | None = None
    context: dict[str, Any] | None = None  # a Dockerfile build's context: key, files, ...
    inputs: dict[str, Any] | None = None  # the key's inputs (keyinputs.py)
    limits: dict[str, Any] | None = None
    callers: int | None = None  # how many requests this build served, once one joined
    # What came of it (flow.Outcome); base_ref and target_ref are known early when given.
    base_ref: str | None = None
    target_ref: str | None = None
    digest: str | None = None
    base_digest: str | None = None
    cache: dict[str, Any] | None = None
    timings: dict[str, float] | None = None
    base_miss: list[str] | None = None
    error: ErrorDict | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # --- state ----------------------------------------------------------------------------------

    def move(self, state: str, *, at: float | None = None) -> None:
        """Change the state (and ``started``/``finished``), or raise IllegalTransition leaving
        the record as it was."""
        if state not in _MOVES.get(self.state, frozenset()):
            raise IllegalTransition(f"build {self.id}: {self.state} -> {state} is not allowed")
        now = time.time() if at is None else at
        self.state = state
        self.transitions.append(Transition(state, now))
        if state == RUNNING:
            self.started = now
        if state in FINAL:
            self.finished = now

    @property
    def done(self) -> bool:
        return self.state in FINAL

    def set_outcome(self, outcome: Mapping[str, Any]) -> None:
        """What a run produced (``flow.Outcome.to_dict()``, with the manager's timings)."""
        self.target_ref = outcome.get("target_ref", self.target_ref)
        self.digest = outcome.get("digest", self.digest)
        self.base_ref = outcome.get("base_ref", self.base_ref)
        self.base_digest = outcome.get("base_digest", self.base_digest)
        self.cache = outcome.get("cache", self.cache)
        self.timings = outcome.get("timings", self.timings)
        self.base_miss = outcome.get("base_miss", self.base_miss)

    def add_owner(self, uid: int) -> bool:
        """Make ``uid`` an owner (a caller joined); True when it was not one yet."""
        if uid in self.owners:
            return False
        self.owners.append(uid)
        return True

    # --- wire and disk --------------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        """The build result (docs/protocol.md section 7.2, DESIGN section 2)."""
        return {
            "id": self.id,
            "state": self.state,
            "target_ref": self.target_ref or "",
            "digest": self.digest or "",
            "base_ref": self.base_ref or "",
            "cache": self.cache if self.cache is not None else {"base": None, "workspace": None},
            "timings": self.timings if self.timings is not None else {},
            "error": self.error,
        }

    def to_json(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and value is not None:
                out[f.name] = value
        out["transitions"] = [{"state": t.state, "at": t.at} for t in self.transitions]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BuildRecord:
        """A record as any version wrote it; ValueError when it is not one (no string id)."""
        build_id = data.get("id")
        if not isinstance(build_id, str):
            raise ValueError("no id")
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("id", "transitions"):
                continue
            if key not in _TYPES:
                extra[key] = value
            elif isinstance(value, _TYPES[key]) and not isinstance(value, bool):
                known[key] = value
        record = cls(id=build_id, extra=extra, **known)
        record.transitions = [
            Transition(str(t.get("state")), t.get("at", 0.0))
            for t in data.get("transitions") or []
            if isinstance(t, dict)
        ]
        record.owners = [u for u in record.owners if isinstance(u, int)]
        if "owners" not in known:  # written before owners existed: the submitter's build
            uid = (record.peer or {}).get("uid")
            record.owners = [uid] if isinstance(uid, int) else []
        return record


class RecordStore:
    """Every build record, in memory and on disk. Single-threaded: used from the event loop."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir) / "builds"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._records: dict[str, BuildRecord] = {}

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
                data = json.loads(path.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("build record %s unreadable (%s); moved aside", path.name, exc)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".json.bad"))
                continue
            try:
                record = BuildRecord.from_json(data) if isinstance(data, dict) else None
            except ValueError:
                record = None
            if record is None or record.id != path.stem:
                log.warning("build record %s is not a record; ignored", path.name)
                continue
            self._records[record.id] = record
            if not record.done:
                was = record.state
                if was not in _MOVES:  # a state this version does not know: not running now
                    record.state = QUEUED
                self.transition(
                    record,
                    INTERRUPTED,
                    error={
                        "code": "internal",
                        "message": f"the daemon stopped while this build was {was}; "
                        "run the build again",
                        "details": {},
                    },
                )
                interrupted.append(record.id)
        for tmp in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        return interrupted

    def create(self, record: BuildRecord) -> BuildRecord:
        """Enter a new record, queued, on disk first: a record that cannot be written is not
        known either (OSError)."""
        now = time.time()
        if record.created is None:
            record.created = now
        record.state = QUEUED
        record.transitions = [Transition(QUEUED, now)]
        self.save(record)
        self._records[record.id] = record
        return record

    def transition(
        self,
        record: BuildRecord,
        state: str,
        *,
        error: ErrorDict | None = None,
        outcome: Mapping[str, Any] | None = None,
    ) -> None:
        """Move ``record`` to ``state`` (:meth:`BuildRecord.move`: IllegalTransition changes
        nothing), with what the build produced, and write it. The record in memory has moved
        even when the write fails (OSError): the callers still get the outcome."""
        record.move(state)
        if outcome is not None:
            record.set_outcome(outcome)
        if error is not None:
            record.error = error
        self.save(record)

    def save(self, record: BuildRecord) -> None:
        data = json.dumps(record.to_json(), sort_keys=True, separators=(",", ":")).encode()
        # A lost rename of a queued/running record (power loss) reads back as the previous
        # state, which the next start marks interrupted anyway: only final states pay for the
        # directory fsync.
        atomic_write(self._path(record.id), data + b"\n", durable=record.done)

    # --- queries --------------------------------------------------------------------------------

    def get(self, build_id: str) -> BuildRecord:
        record = self._records.get(build_id)
        if record is None:
            raise NotFound(f"no build {build_id!r}; 'agentctl ls' lists the known builds")
        return record

    def all(self) -> list[BuildRecord]:
        return sorted(self._records.values(), key=lambda r: (r.created or 0, r.id))

    # --- retention ------------------------------------------------------------------------------

    def prune(self, *, max_age: float, max_count: int, now: float | None = None) -> list[str]:
        """Drop finished records (and their logs) older than ``max_age`` seconds, then the oldest
        beyond ``max_count``. Unfinished builds are never pruned."""
        now = time.time() if now is None else now
        finished = [r for r in self.all() if r.done]
        doomed = [r for r in finished if now - _finished_at(r, now) > max_age]
        rest = [r for r in finished if r not in doomed]
        if len(rest) > max_count:
            doomed += rest[: len(rest) - max_count]
        for r in doomed:
            self._records.pop(r.id, None)
            for path in (
                self._path(r.id),
                self.dir / f"{r.id}.log",
                self.dir / f"{r.id}.inputs",
            ):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if doomed:
            log.info("pruned %d finished build records", len(doomed))
        return [r.id for r in doomed]


def _finished_at(record: BuildRecord, default: float) -> float:
    if record.finished is not None:
        return record.finished
    return record.created if record.created is not None else default


__all__ = [
    "CANCELLED",
    "FAILED",
    "FINAL",
    "INTERRUPTED",
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "TIMED_OUT",
    "BuildRecord",
    "RecordStore",
    "Transition",
    "atomic_write",
    "new_id",
]
