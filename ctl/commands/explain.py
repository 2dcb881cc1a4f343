"""``agentctl explain ID`` and ``agentctl diff ID1 ID2``: why a build was (not) a base cache hit,
and what differs between the key inputs of two builds (the daemon's ``explain`` and ``diff``
ops, docs/protocol.md section 7.4). ``--json`` prints the op's result as it is.

explain prints the key and the verdict; for a rebuild, what changed since the newest earlier
build of the same target repository and Dockerfile: context paths added, removed or changed,
each FROM ref that moved (old -> new digest), build args that changed (names only), the
Dockerfile, the target, the platform.
"""

from __future__ import annotations

import argparse

TYPE_CHECKING = False  # typing is not imported at run time: agentctl's start-up is measured
if TYPE_CHECKING:
    from typing import Any

    from ctl.cli import Context, Subcommands

_MAX_PATHS = 50  # per list in the text output; --json has them all


def register(sub: Subcommands) -> None:
    p = sub.add_parser("explain", help="why a build was or was not a cache hit")
    p.add_argument("id", help="build id (agentctl ls)")
    p.set_defaults(run=_explain)
    p = sub.add_parser("diff", help="what differs between the key inputs of two builds")
    p.add_argument("a", metavar="ID1", help="the older build")
    p.add_argument("b", metavar="ID2", help="the newer build")
    p.set_defaults(run=_diff)


def _paths(label: str, paths: list[str]) -> list[str]:
    lines = [f"  {label} {p}" for p in paths[:_MAX_PATHS]]
    if len(paths) > _MAX_PATHS:
        lines.append(f"  ... and {len(paths) - _MAX_PATHS} more {label.strip()} (--json lists all)")
    return lines


def describe_changes(changes: Any) -> list[str]:
    """Lines naming each change of a ``changes`` map (keyinputs.compare)."""
    if changes is None:
        return []
    if not changes:
        return ["  nothing: the key inputs are the same"]
    out: list[str] = []
    if changes.get("dockerfile"):
        out.append("  Dockerfile edited")
    if "syntax" in changes:
        s = changes["syntax"]
        out.append(f"  # syntax= changed: {s['old']} -> {s['new']}")
    for m in changes.get("images_moved", []):
        out.append(f"  image moved: {m['ref']}: {m['old']} -> {m['new']}")
    for m in changes.get("images_added", []):
        out.append(f"  image added: {m['ref']} ({m['digest']})")
    for m in changes.get("images_removed", []):
        out.append(f"  image removed: {m['ref']} ({m['digest']})")
    args = changes.get("args") or {}
    for kind in ("changed", "added", "removed"):
        if args.get(kind):
            out.append(f"  build args {kind}: {', '.join(args[kind])}")
    for field in ("target", "platform", "secret_ids", "process_version"):
        if field in changes:
            c = changes[field]
            out.append(f"  {field} changed: {c['old']} -> {c['new']}")
    ctx = changes.get("context")
    if ctx is not None:
        if ctx.get("changed") is True:
            out.append("  context files changed (no per-file summary kept for one of the builds)")
        else:
            out += _paths("added  ", ctx.get("added", []))
            out += _paths("removed", ctx.get("removed", []))
            out += _paths("changed", ctx.get("changed", []))
    return out


def _explain_text(r: Any) -> str:
    lines = [f"build {r['id']} ({r['state']})"]
    inputs = r.get("inputs")
    if not inputs:
        lines.append(r.get("note", "no key inputs recorded"))
        return "\n".join(lines)
    lines.append(
        f"key {r['key']}" + (" (unknown: rebuilt)" if inputs["status"] == "unknown" else "")
    )
    for why in inputs.get("unknown", []):
        lines.append(f"  cannot evaluate: {why}")
    for img in inputs.get("images", []):
        lines.append(f"  {img['kind']} {img['ref']} -> {img['digest']} (line {img['line']})")
    verdict = r["verdict"]
    if verdict == "hit":
        lines.append(f"base cache hit: {r['base_ref']} already existed")
    elif verdict == "miss":
        lines.append(f"base rebuilt ({', '.join(r.get('reasons') or ['?'])})")
    else:
        lines.append("the base was not checked (the build failed or stopped before, or has none)")
    prev = r.get("compared_to")
    if prev is None:
        lines.append("no earlier build of this target repository and Dockerfile to compare with")
    else:
        lines.append(f"compared with {prev['id']} (key {prev['key']}):")
        lines += describe_changes(r.get("changes"))
    return "\n".join(lines)


def _diff_text(r: Any) -> str:
    same = "same key" if r["same_key"] else "different keys"
    lines = [f"{r['a']['id']} -> {r['b']['id']}: {same}"]
    lines += describe_changes(r["changes"])
    return "\n".join(lines)


def _explain(opts: argparse.Namespace, ctx: Context) -> int:
    with ctx.connect() as client:
        result = client.call("explain", {"id": opts.id})
    ctx.emit(result, _explain_text)
    return 0


def _diff(opts: argparse.Namespace, ctx: Context) -> int:
    with ctx.connect() as client:
        result = client.call("diff", {"a": opts.a, "b": opts.b})
    ctx.emit(result, _diff_text)
    return 0
