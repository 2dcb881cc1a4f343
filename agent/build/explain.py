"""The ``explain`` and ``diff`` ops (docs/protocol.md section 7.4): why a build was or was not a
base cache hit, and what differs between the key inputs of two builds.

Both read ``record.inputs`` and the per-entry summaries beside the records
(agent/build/keyinputs.py); the summaries are decompressed in a thread. A record without
inputs (a ref-only build, or one recorded by a version before key inputs) is answered
for what it has: explain says so, diff refuses it with ``bad_request``.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

from agent.build import keyinputs, ownership
from agent.build.manager import BuildManager
from agent.build.records import BuildRecord, RecordStore
from agent.control.ops import Access, Args, Registry, RequestContext
from agent.errors import BadRequest, InternalError, NotFound


def _manager(ctx: RequestContext) -> BuildManager:
    m = ctx.app.builds
    if not isinstance(m, BuildManager):
        raise InternalError("builds are not available: the build manager did not start")
    return m


def _entries(store: RecordStore, build_id: str) -> dict[str, str] | None:
    blob = store.load_entries(build_id)
    if blob is None:
        return None
    try:
        return keyinputs.decode_entries(blob)
    except (zlib.error, ValueError):
        return None


async def _changes(store: RecordStore, old: BuildRecord, new: BuildRecord) -> dict[str, Any]:
    old_inputs, new_inputs = old.inputs or {}, new.inputs or {}

    def load() -> tuple[dict[str, str] | None, dict[str, str] | None]:
        if old_inputs.get("entries_digest") == new_inputs.get("entries_digest"):
            return None, None  # the same context: no need to read the summaries
        return _entries(store, old.id), _entries(store, new.id)

    a, b = await asyncio.to_thread(load)
    return keyinputs.compare(old_inputs, new_inputs, a, b)


def _summary(record: BuildRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "state": record.state,
        "created": record.created,
        "key": (record.inputs or {}).get("key"),
        "base_ref": record.base_ref or "",
    }


def _verdict(record: BuildRecord) -> str:
    base = (record.cache or {}).get("base")
    if base is True:
        return "hit"
    if base is False:
        return "miss"
    return "not_checked"  # failed or stopped before the base check, or a ref-only build


async def explain(ctx: RequestContext, args: Args) -> dict[str, Any]:
    """``{id}`` -> the build's key, whether its base was a cache hit and, for a rebuild, what
    differed from the newest earlier build of the same target repository and Dockerfile."""
    args.only("id")
    store = _manager(ctx).store
    record = store.get(args.string("id", required=True))
    ownership.check_read(ctx.app.config, record, ctx.peer, "key inputs")
    inputs = record.inputs
    out: dict[str, Any] = {
        **_summary(record),
        "cache": record.result()["cache"],
        "verdict": _verdict(record),
        "reasons": list(record.base_miss or []),
        "inputs": inputs,
        "compared_to": None,
        "changes": None,
    }
    if not inputs:
        out["note"] = (
            "no key inputs were recorded for this build: it is a ref-only build, or was "
            "recorded by a version that did not keep them"
        )
        return out
    prev_id = inputs.get("compared_to")
    prev = None
    if prev_id:
        try:
            prev = store.get(prev_id)
        except NotFound:
            prev = None  # pruned since
    readable = [r for r in store.all() if ownership.may_read(ctx.app.config, r, ctx.peer)]
    if prev is not None and not ownership.may_read(ctx.app.config, prev, ctx.peer):
        prev = None  # another caller's build: its files are not this caller's to see
    if prev is None:
        prev = keyinputs.previous(readable, record)
    if prev is not None and prev.inputs:
        out["compared_to"] = _summary(prev)
        out["changes"] = await _changes(store, prev, record)
    return out


async def diff(ctx: RequestContext, args: Args) -> dict[str, Any]:
    """``{a, b}`` -> what differs in the key inputs from build ``a`` to build ``b``."""
    args.only("a", "b")
    store = _manager(ctx).store
    records = [store.get(args.string(k, required=True)) for k in ("a", "b")]
    for r in records:
        ownership.check_read(ctx.app.config, r, ctx.peer, "key inputs")
    for r in records:
        if not r.inputs:
            raise BadRequest(
                f"build {r.id} has no recorded key inputs (a ref-only build, or recorded by "
                "an older version): diff needs two Dockerfile builds",
                details={"id": r.id},
            )
    a, b = records
    changes = await _changes(store, a, b)
    return {
        "a": _summary(a),
        "b": _summary(b),
        "same_key": (a.inputs or {}).get("key") == (b.inputs or {}).get("key"),
        "changes": changes,
        "reasons": keyinputs.reasons(changes) if changes else [],
    }


def register(ops: Registry) -> None:
    ops.add("explain", Access.READ, explain)
    ops.add("diff", Access.READ, diff)


__all__ = ["diff", "explain", "register"]
