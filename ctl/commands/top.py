"""``agentctl top``: a live view of the running and queued builds (refreshed until Ctrl-C).

``--once`` (or ``--json``) prints one snapshot and exits, for scripts and tests.
"""

from __future__ import annotations

import argparse
import sys
import time

TYPE_CHECKING = False  # typing is not imported at run time: agentctl's start-up is measured
if TYPE_CHECKING:
    from typing import Any

    from ctl.cli import Context, Subcommands
    from ctl.client import Client


def register(sub: Subcommands) -> None:
    p = sub.add_parser("top", help="live view of running and queued builds (Ctrl-C quits)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.set_defaults(run=_top)


def snapshot(client: Client) -> dict[str, Any]:
    info = client.call("info")
    running = client.call("list", {"state": "running", "limit": 1000})["builds"]
    queued = client.call("list", {"state": "queued", "limit": 1000})["builds"]
    cfg = info.get("config") or {}
    return {
        "time": time.time(),
        "version": info.get("version"),
        "slots": cfg.get("max_concurrent_builds"),
        "max_queued": cfg.get("max_queued"),
        "running": running,
        "queued": queued[::-1],  # oldest first: the order they will run in
    }


def _age(created: Any, now: float) -> str:
    if not isinstance(created, int | float):
        return "-"
    s = max(0, int(now - created))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def render(snap: dict[str, Any]) -> str:
    now = float(snap["time"])
    lines = [
        f"build-agent {snap['version']}  {time.strftime('%H:%M:%S', time.localtime(now))}  "
        f"running {len(snap['running'])}/{snap['slots']}  "
        f"queued {len(snap['queued'])}/{snap['max_queued']}",
        "",
        f"{'STATE':<8} {'AGE':>7}  {'ID':<22}  TARGET",
    ]
    for state in ("running", "queued"):
        for b in snap[state]:
            lines.append(
                f"{state:<8} {_age(b.get('created'), now):>7}  {b['id']:<22}  "
                f"{b.get('target_ref') or '-'}"
            )
    if not snap["running"] and not snap["queued"]:
        lines.append("(no builds running or queued)")
    return "\n".join(lines)


def _top(opts: argparse.Namespace, ctx: Context) -> int:
    with ctx.connect() as client:
        if opts.once or ctx.json:
            ctx.emit(snapshot(client), render)
            return 0
        tty = sys.stdout.isatty()
        while True:
            text = render(snapshot(client))
            # On a terminal: clear and redraw in place; elsewhere one snapshot after another.
            sys.stdout.write(("\x1b[H\x1b[2J" if tty else "") + text + "\n" + ("" if tty else "\n"))
            sys.stdout.flush()
            time.sleep(max(0.1, opts.interval))
