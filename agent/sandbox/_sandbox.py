"""The sandbox's lifecycle: tear down leftovers, create, probe, serve, remove (DESIGN section 4)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

from agent.errors import StartupError
from agent.runtime import App
from agent.sandbox import _egress, _netns
from agent.sandbox._listen import listen_inside
from agent.sandbox._wrap import HidePlan, Wrapper, hide_plan

log = logging.getLogger("agent.sandbox")

_PROBE_TIMEOUT = 10.0


SandboxState = Literal["starting", "on", "removed"]


class Sandbox:
    """The sandbox while on: :class:`agent.contracts.SandboxPort` plus ``state`` for ``info``."""

    mode: Literal["on"] = "on"

    def __init__(self, netns: str, plan: HidePlan, egress: _egress.Egress | None) -> None:
        self.netns = netns
        self.plan = plan
        self.egress = egress
        self._wrapper = Wrapper(_netns.path(netns), plan, parent=os.getpid())
        self._state: SandboxState = "starting"

    @property
    def state(self) -> SandboxState:
        return self._state

    def describe(self) -> dict[str, Any]:
        return {
            "mode": "on",
            "state": self._state,
            "netns": self.netns,
            "egress": "nat" if self.egress else "none",
            "hidden": list(self.plan.dirs),
            "read_only": list(self.plan.readonly),
        }

    def wrap(
        self, argv: list[str], *, pid_namespace: bool = False, visible: Sequence[str] = ()
    ) -> list[str]:
        return self._wrapper.wrap(argv, pid_namespace=pid_namespace, visible=visible)

    def listen(self, port: int) -> socket.socket:
        return listen_inside(self.netns, port)

    # --- lifecycle (blocking: a start or stop must not be half-done by a cancellation) -------

    def create(self) -> None:
        _netns.run_inside(None, self._create)

    def close(self) -> None:
        if self._state != "removed":
            _netns.run_inside(None, self._close)

    def _create(self) -> None:
        name = self.netns
        leftovers = [
            what
            for what, there in (
                ("network namespace", _netns.exists(name)),
                ("veth", _egress.link_exists(name)),
                ("nft table", _egress.table_exists(name)),
            )
            if there
        ]
        if leftovers:
            log.warning(
                "removing what an earlier daemon left of sandbox %s: %s", name, ", ".join(leftovers)
            )
        _egress.remove(name)
        try:
            _netns.create(name)
        except _netns.Refused as exc:
            raise StartupError(str(exc)) from exc
        if self.egress is not None:
            try:
                _egress.setup(self.egress)
            except BaseException:
                _netns.remove(name)
                raise
        self._state = "on"

    def _close(self) -> None:
        if self.egress is not None:
            _egress.teardown(self.egress)
        _netns.remove(self.netns)
        self._state = "removed"
        log.info("sandbox %s removed", self.netns)

    async def probe(self) -> None:
        """Start one wrapped child, so a kernel or privilege refusal stops the start now."""
        argv = self.wrap([sys.executable, "-I", "-S", "-c", "pass"], pid_namespace=True)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), _PROBE_TIMEOUT)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if proc.returncode != 0:
            why = err.decode("utf-8", "replace").strip() or f"exit status {proc.returncode}"
            raise StartupError(
                f"the sandbox cannot start a child: {why}. The daemon needs root on a kernel with "
                "network, mount and PID namespaces (Linux 5.2 or later); in a container, give it "
                'CAP_SYS_ADMIN and its own cgroup, or set sandbox.mode = "off"'
            )


class OffSandbox:
    """``sandbox.mode = "off"`` (:class:`agent.contracts.SandboxPort`): children run on the
    host; the proxy listens on the host's loopback. Reported as "off" by ``info``."""

    mode: Literal["off"] = "off"

    @property
    def state(self) -> Literal["off"]:
        return "off"

    def describe(self) -> dict[str, Any]:
        return {"mode": "off", "state": "off"}

    def wrap(
        self, argv: list[str], *, pid_namespace: bool = False, visible: Sequence[str] = ()
    ) -> list[str]:
        return list(argv)

    def listen(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock


def _require_root() -> None:
    if os.geteuid() != 0:
        raise StartupError(
            'sandbox.mode = "on" needs the daemon to run as root (it creates network, mount and '
            'PID namespaces); run it as root, or set sandbox.mode = "off" for development'
        )


def _prepare_dirs(plan: HidePlan, app: App) -> None:
    # Kept directories must exist before a child starts: a child cannot create them under the
    # read-only tmpfs that hides the rest. Hidden state directories exist too, so that one the
    # daemon creates later is hidden from children already running.
    for d in plan.keeps:
        os.makedirs(d, mode=0o700, exist_ok=True)
    state = os.path.abspath(app.config.daemon.state_dir)
    for d in plan.dirs:
        if os.path.dirname(d) == state:
            os.makedirs(d, mode=0o700, exist_ok=True)
    for d in plan.private:  # per-build staging roots: hidden even before the first build
        os.makedirs(d, mode=0o700, exist_ok=True)


@asynccontextmanager
async def open_sandbox(app: App) -> AsyncIterator[Sandbox | OffSandbox]:
    """Create the sandbox for the daemon's lifetime; remove it on exit."""
    cfg = app.config.sandbox
    if cfg.mode == "off":
        log.warning(
            'sandbox.mode = "off": build children run on the host network and see the host\'s '
            "files and processes (credentials included); for development only"
        )
        yield OffSandbox()
        return
    _require_root()
    plan = hide_plan(app.config)
    for warning in plan.warnings:
        log.warning("%s", warning)
    _prepare_dirs(plan, app)
    egress = _egress.plan(cfg.netns, cfg.nat_subnet) if cfg.egress == "nat" else None
    sb = Sandbox(cfg.netns, plan, egress)
    try:
        sb.create()
        await sb.probe()
        log.info(
            "sandbox on: network namespace %s, egress %s; children are hidden %s",
            cfg.netns,
            cfg.egress,
            ", ".join(plan.dirs),
        )
        yield sb
    finally:
        sb.close()
