"""The daemon's own ops: ``ping`` and ``info`` (read), ``drain`` and ``reload`` (admin, root only).

:func:`register` adds them to the daemon's op table.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any

from agent import PROCESS_VERSION
from agent.config import RouteConfig
from agent.control.ops import Access, Args, Registry, RequestContext
from agent.errors import AgentError
from agent.runtime import App
from ctl import protocol

_log = logging.getLogger("agent.control")


async def ping(ctx: RequestContext, args: Args) -> dict[str, Any]:
    return {"pong": True, "version": ctx.app.version}


def component_states(app: App) -> dict[str, str]:
    """``info``'s ``components``: each started component's own ``state``."""
    toolchain = app.toolchain
    return {
        "control": "running",
        "sandbox": app.sandbox.state if app.sandbox is not None else "off",
        "proxy": app.proxy.state if app.proxy is not None else "absent",
        "builds": app.builds.state if app.builds is not None else "absent",
        "toolchain": toolchain.state if toolchain is not None else "absent",
    }


def warnings(app: App) -> list[str]:
    out = []
    if app.config.sandbox.mode == "off":
        out.append(
            "sandbox is OFF: build steps run on the host's network and can reach the host; "
            'set sandbox.mode = "on" outside development'
        )
        if app.proxy is not None:
            out.append(
                "sandbox is OFF: the proxy's build listener is on the host's loopback, where "
                "any local user can pull through its mirrors and children = true routes"
            )
    cgroups = app.builds.cgroups if app.builds is not None else None
    if cgroups is not None and cgroups.version == 0:
        out.append(
            f"per-build limits are NOT applied ({cgroups.reason}): a build may use all of the "
            "node's memory, processes and CPU"
        )
    if app.draining:
        out.append("draining: new builds are refused (agentctl drain --off resumes)")
    return out


def _limits(app: App) -> dict[str, Any]:
    """The node's per-build ceilings (build.memory_max, pids_max, cpu_max) and whether cgroups
    apply them."""
    b = app.config.build
    cgroups = app.builds.cgroups if app.builds is not None else None
    return {
        "memory_max": b.memory_max,
        "pids_max": b.pids_max,
        "cpu_max": b.cpu_max,
        "cgroups": cgroups.words() if cgroups is not None else "not started",
    }


def _proxy_access(app: App) -> dict[str, Any]:
    """Who may use the proxy from where (docs/proxy.md "Access"): the host listener's address
    and authorization, and what build children may do with each static route."""
    host: dict[str, str] = (
        app.proxy.host_listener()
        if app.proxy is not None
        else {"address": "off", "auth": "none (no proxy)"}
    )
    routes = [
        {"name": r.name, "access": r.access, "children": _children_may(r)}
        for r in app.config.proxy.routes
    ]
    return {"host_listener": host, "static_routes": routes}


def _children_may(route: RouteConfig) -> str:
    if not route.children:
        return "no"
    if route.builds and route.access == "push":
        return "read, write for builds under " + ", ".join(route.builds)
    return "read-only"


async def info(ops: Registry, ctx: RequestContext, args: Args) -> dict[str, Any]:
    """The daemon's state; ``ops`` is the table it serves (its names are listed)."""
    app = ctx.app
    c = app.config
    return {
        "version": app.version,
        "process_version": PROCESS_VERSION,
        "protocol": protocol.VERSION,
        "pid": os.getpid(),
        "started_at": app.started_wall,
        "uptime": round(app.uptime(), 3),
        "dev_mode": app.dev_mode,
        "draining": app.draining,
        "components": component_states(app),
        "config": {
            "source": c.source,
            "toolchain": app.toolchain.name if app.toolchain is not None else c.build.toolchain,
            "max_concurrent_builds": c.build.max_concurrent_builds,
            "max_queued": c.build.max_queued,
            "sandbox": c.sandbox.mode,
            "egress": c.sandbox.egress,
            "metrics_address": c.daemon.metrics_address,
            "proxy_port": c.proxy.port,
            "proxy": _proxy_access(app),
            "limits": _limits(app),
            "storage": app.toolchain.storage.words() if app.toolchain is not None else {},
        },
        "ops": ops.names(),
        "peer": {"uid": ctx.peer.uid, "gid": ctx.peer.gid},
        "warnings": warnings(app),
    }


async def drain(ctx: RequestContext, args: Args) -> dict[str, Any]:
    """``{enable: bool = true}``: refuse new builds (running and queued ones go on)."""
    args.only("enable")
    enable = args.flag("enable", True)
    if enable != ctx.app.draining:
        ctx.app.draining = enable
        _log.info("draining %s by uid %d", "on" if enable else "off", ctx.peer.uid)
    return {"draining": ctx.app.draining}


async def reload_components(app: App) -> dict[str, str]:
    """Reload what can be reloaded (SIGHUP and ``reload``): the proxy re-reads its credentials
    and the host token."""
    done: dict[str, str] = {}
    if app.proxy is not None:
        try:
            app.proxy.reload()
        except Exception as exc:
            _log.exception("reloading proxy failed")
            # Only our own errors have messages known to be free of credentials.
            why = exc.message if isinstance(exc, AgentError) else type(exc).__name__
            done["proxy"] = f"failed: {why}"
        else:
            done["proxy"] = "reloaded"
    _log.info("reload: %s", ", ".join(f"{k} {v}" for k, v in done.items()) or "nothing to reload")
    return done


async def reload(ctx: RequestContext, args: Args) -> dict[str, Any]:
    args.only()
    return {"components": await reload_components(ctx.app)}


def register(ops: Registry) -> None:
    ops.add("ping", Access.READ, ping)
    ops.add("info", Access.READ, partial(info, ops))
    ops.add("drain", Access.ADMIN, drain)
    ops.add("reload", Access.ADMIN, reload)
