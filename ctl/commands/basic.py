"""``agentctl ping`` and ``agentctl info``, and the admin ``drain`` / ``reload``."""

from __future__ import annotations

import argparse
import time

TYPE_CHECKING = False  # typing is not imported at run time: agentctl's start-up is measured
if TYPE_CHECKING:
    from typing import Any

    from ctl.cli import Context, Subcommands

_PING_TIMEOUT = 10.0


def register(sub: Subcommands) -> None:
    p = sub.add_parser("ping", help="check that the daemon answers")
    p.set_defaults(run=_ping)
    p = sub.add_parser("info", help="version, uptime, config summary, component states")
    p.set_defaults(run=_info)
    p = sub.add_parser("drain", help="(root) refuse new builds; --off resumes")
    p.add_argument("--off", action="store_true", help="stop draining")
    p.set_defaults(run=_drain)
    p = sub.add_parser("reload", help="(root) re-read credentials and reloadable settings")
    p.set_defaults(run=_reload)


def _ping(opts: argparse.Namespace, ctx: Context) -> int:
    started = time.perf_counter()
    with ctx.connect(ctx.timeout or _PING_TIMEOUT) as client:
        result = client.call("ping")
    elapsed = (time.perf_counter() - started) * 1000
    result = {**result, "socket": ctx.socket, "ms": round(elapsed, 3)}
    ctx.emit(result, lambda r: f"pong from build-agent {r.get('version')} in {r['ms']:.2f} ms")
    return 0


def _info(opts: argparse.Namespace, ctx: Context) -> int:
    with ctx.connect() as client:
        result = client.call("info")
    ctx.emit(result, _format_info)
    return 0


def _format_info(r: dict[str, Any]) -> str:
    lines = [
        f"build-agent {r.get('version')} (protocol v{r.get('protocol')}, pid {r.get('pid')})",
        f"uptime      {_duration(float(r.get('uptime', 0)))}",
    ]
    if r.get("dev_mode"):
        lines.append("mode        development (temporary state, local registry)")
    cfg = r.get("config") or {}
    lines.append(f"config      {cfg.get('source', '?')}")
    lines.append(
        f"builds      toolchain {cfg.get('toolchain')}, {cfg.get('max_concurrent_builds')} at once,"
        f" {cfg.get('max_queued')} queued"
    )
    lim = cfg.get("limits") or {}
    if lim:
        lines.append(
            f"limits      memory_max {lim.get('memory_max')}, pids_max {lim.get('pids_max')}, "
            f"cpu_max {lim.get('cpu_max') or 'none'} a build ({lim.get('cgroups')})"
        )
    st = cfg.get("storage") or {}
    if st:
        note = f"; {st['note']}" if st.get("note") else ""
        lines.append(
            f"storage     {st.get('driver')}: {st.get('used')} of {st.get('max')}, "
            f"{st.get('reclaimed_bytes', 0)} bytes reclaimed{note}"
        )
    lines.append(f"sandbox     {cfg.get('sandbox')} (egress {cfg.get('egress')})")
    lines.append(f"metrics     {cfg.get('metrics_address') or 'off'}")
    px = cfg.get("proxy") or {}
    host = px.get("host_listener") or {}
    if host:
        auth = host.get("auth", "?")
        if host.get("token_file"):
            auth += f" (from {host['token_file']})"
        lines.append(f"proxy host  {host.get('address', '?')}, auth {auth}")
    for route in px.get("static_routes") or []:  # not ``r``: that is the whole result
        lines.append(
            f"route       {route.get('name')} ({route.get('access')}), "
            f"children: {route.get('children')}"
        )
    comps = r.get("components") or {}
    lines.append("components  " + ", ".join(f"{k}={v}" for k, v in sorted(comps.items())))
    if r.get("draining"):
        lines.append("draining    yes: new builds are refused")
    for w in r.get("warnings") or []:
        lines.append(f"WARNING     {w}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _drain(opts: argparse.Namespace, ctx: Context) -> int:
    with ctx.connect() as client:
        result = client.call("drain", {"enable": not opts.off})
    ctx.emit(result, lambda r: "draining" if r.get("draining") else "not draining")
    return 0


def _reload(opts: argparse.Namespace, ctx: Context) -> int:
    with ctx.connect() as client:
        result = client.call("reload")
    comps = result.get("components") or {}
    ctx.emit(
        result,
        lambda r: "\n".join(f"{k}: {v}" for k, v in comps.items()) or "nothing to reload",
    )
    return 0
