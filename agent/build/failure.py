"""A failed build's error: what its output says it ran into, and what its callers get.

``out_of_disk`` and ``limited`` read a toolchain's error (its message and ``log_tail``) and,
when the disk filled up or the build's cgroup hit a limit, say so instead (``details.limit``);
the manager applies them as a build fails. ``error_of`` turns a finished record's stored error
back into the ``AgentError`` its callers receive, by its wire code.
"""

from __future__ import annotations

from agent.build import records as rec
from agent.build.records import BuildRecord
from agent.build.storage import StorageReport, disk_full, free_bytes, full_message
from agent.errors import (
    AgentError,
    BadRequest,
    BuildFailed,
    Cancelled,
    Forbidden,
    InternalError,
    NotFound,
    TimedOut,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from agent.sandbox import BuildCgroup


def error_of(record: BuildRecord) -> AgentError | None:
    """The error a finished record's callers get (None on success)."""
    err = record.error
    if record.state == rec.SUCCEEDED or not err:
        return None
    cls = _ERRORS.get(err.get("code", ""), InternalError)
    details = dict(err.get("details") or {})
    details.setdefault("id", record.id)
    return cls(err.get("message", ""), details=details)


_ERRORS: dict[str, type[AgentError]] = {
    c.code: c
    for c in (
        BadRequest,
        Forbidden,
        NotFound,
        BuildFailed,
        Cancelled,
        TimedOut,
        UpstreamUnauthorized,
        UpstreamUnavailable,
        InternalError,
    )
}


def out_of_disk(exc: AgentError, storage: StorageReport) -> AgentError | None:
    """A BuildFailed saying that the disk is full, when the build's output says so; None else."""
    tail = exc.details.get("log_tail")
    lines = [str(x) for x in tail] if isinstance(tail, list) else []
    text = "\n".join([*lines, exc.message])
    if not disk_full(text):
        return None
    free = free_bytes(storage.paths[0]) if storage.paths else None
    return BuildFailed(full_message(storage, free), details={**exc.details, "limit": "storage"})


def limited(exc: AgentError, cgroup: BuildCgroup | None, steps_inside: bool) -> AgentError:
    """``exc``, or a BuildFailed naming the limit the build ran into (its cgroup's counters;
    the build's output too when its RUN steps run inside that cgroup)."""
    if cgroup is None or "limit" in exc.details:  # the toolchain named one already
        return exc
    tail = exc.details.get("log_tail")
    output = [*(tail if isinstance(tail, list) else []), *exc.message.splitlines()]
    if not steps_inside:
        output = []
    hit = cgroup.limit_hit([str(x) for x in output])
    if hit is None:
        return exc
    return limit_failure(
        exc,
        hit,
        "lower what the build needs, or ask the node's operator for a higher limit "
        "(build.memory_max, build.pids_max)",
    )


def limit_failure(exc: AgentError, hit: str, advice: str) -> BuildFailed:
    """The failure ``exc`` said again as the limit ``hit`` (e.g. "the build hit pids_max 256"),
    with the first line of what failed and what to do."""
    return BuildFailed(
        f"{hit} ({exc.message.splitlines()[0]}); {advice}", details={**exc.details, "limit": hit}
    )


__all__ = ["error_of", "limit_failure", "limited", "out_of_disk"]
