"""The daemon's lifecycle: ordered start on an AsyncExitStack, readiness, signals, ordered stop.

Start order (each step's cleanup goes on the stack, so shutdown runs in exactly the reverse order):

    state/runtime dirs -> metrics -> sandbox -> proxy -> [connection closer] -> resolver -> builds
    -> control socket listening -> READY=1 (+ watchdog)

Shutdown (SIGTERM/SIGINT, DESIGN section 7): ``STOPPING=1``, ``app.draining``; stop accepting and
unlink the socket; builds finish within ``daemon.shutdown_grace`` (``open_builds`` owns that wait);
requests still running get a short moment, then are cancelled and connections closed; proxy,
sandbox and metrics stop. A second signal cancels whatever wait is in progress, so the rest of the
stack closes at once (the sandbox is still removed). SIGHUP: the proxy re-reads its credentials
and host token.

Signal handlers only set state (an event, a counter, a task cancel); all work happens in tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from contextlib import AsyncExitStack

from agent import build as _build
from agent import proxy as _proxy
from agent import sandbox as _sandbox
from agent.build import explain as _explain
from agent.build import handlers as _build_ops
from agent.build import resolve as _resolve
from agent.build.resolve import open_resolver
from agent.config import Config
from agent.control import builtin
from agent.control._listen import bind_control_socket
from agent.control.ops import Registry
from agent.control.server import ControlServer
from agent.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_STARTUP,
    AgentError,
    ConfigError,
    StartupError,
)
from agent.metrics import DaemonMetrics, open_metrics
from agent.notify import SD_LISTEN_FDS_START, Notifier, SystemdEnv, watchdog
from agent.runtime import App

_log = logging.getLogger("agent.daemon")

# Requests other than builds (which the grace period covers) get this long to finish at shutdown.
_REQUEST_GRACE = 2.0


def op_table() -> Registry:
    """Every op the daemon serves. Each handler module adds its own through its ``register``,
    called here and nowhere else (importing a module registers nothing)."""
    ops = Registry()
    for register in (builtin.register, _resolve.register, _build_ops.register, _explain.register):
        register(ops)
    return ops


def prepare_dirs(config: Config) -> None:
    """Create the state (0700) and runtime (0755: clients traverse it to the socket) dirs."""
    for path, mode, key in (
        (config.daemon.state_dir, 0o700, "daemon.state_dir"),
        (config.daemon.runtime_dir, 0o755, "daemon.runtime_dir"),
    ):
        try:
            os.makedirs(path, mode=mode, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"cannot create {key} {path}: {exc.strerror}; "
                "create it or point the key at a writable directory"
            ) from exc


def _activated_socket(sd: SystemdEnv) -> socket.socket | None:
    if sd.listen_fds < 1:
        return None
    if sd.listen_fds > 1:
        _log.warning("socket activation passed %d fds; only fd 3 is used", sd.listen_fds)
    for extra in range(SD_LISTEN_FDS_START + 1, SD_LISTEN_FDS_START + sd.listen_fds):
        with contextlib.suppress(OSError):
            os.close(extra)
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as exc:
        raise StartupError(f"socket activation: fd 3 is not a socket: {exc.strerror}") from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise StartupError(
            "socket activation passed a socket that is not a Unix stream socket; "
            "build-agent.socket must use ListenStream=/run/build-agent/agent.sock"
        )
    os.set_inheritable(sock.fileno(), False)
    return sock


class Daemon:
    """One run of the daemon process: :meth:`serve` returns the process exit code."""

    def __init__(self, config: Config, sd: SystemdEnv, *, dev_mode: bool = False) -> None:
        self.app = App(config, dev_mode=dev_mode)
        self.sd = sd
        self.notifier = Notifier(sd.notify_socket)
        self.server: ControlServer | None = None
        self._stack = AsyncExitStack()
        self._stop: asyncio.Event | None = None
        self._reload: asyncio.Event | None = None
        self._signals = 0
        self._last_signal = int(signal.SIGTERM)
        self._forced = False
        self._current: asyncio.Task[object] | None = None  # the phase a 2nd signal cancels
        self._phase_started = False

    # Signal handlers: state only.
    def _on_stop_signal(self, signum: int) -> None:
        self._signals += 1
        self._last_signal = signum
        assert self._stop is not None
        self._stop.set()
        if self._signals > 1:
            self._forced = True
            asyncio.get_running_loop().call_soon(self._cancel_phase)

    def _cancel_phase(self) -> None:
        if self._current is None:
            return
        if not self._phase_started:
            # A task cancelled before its first step never runs its body: the unwinding would
            # skip every cleanup. Try again once it has begun.
            asyncio.get_running_loop().call_soon(self._cancel_phase)
            return
        self._current.cancel()

    def _on_hup(self) -> None:
        assert self._reload is not None
        self._reload.set()

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        helpers: list[asyncio.Task[None]] = []
        try:
            self._current = asyncio.current_task()
            self._phase_started = True
            try:
                await self._start()
            except asyncio.CancelledError:
                _log.warning("start interrupted by a second signal")
                await self._close_stack()
                return EXIT_FAILURE
            except BaseException:
                await self._close_stack()
                raise
            self._current = None
            helpers.append(loop.create_task(self._reloader()))
            if self.sd.watchdog_usec:
                helpers.append(loop.create_task(watchdog(self.notifier, self.sd.watchdog_usec)))
            self.notifier.notify("READY=1", "STATUS=serving")
            _log.info("ready (pid %d)", os.getpid())
            await self._stop.wait()
            name = signal.Signals(self._last_signal).name
            _log.info(
                "shutting down on %s (grace %gs)", name, self.app.config.daemon.shutdown_grace
            )
            self.notifier.notify("STOPPING=1", f"STATUS=stopping on {name}")
            self.app.draining = True
            await self._close_stack()
        finally:
            for task in helpers:
                task.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.notifier.close()
        _log.info("stopped%s", " (forced by a second signal)" if self._forced else "")
        return EXIT_FAILURE if self._forced else EXIT_OK

    async def _close_stack(self) -> None:
        # Run in its own task so that a second signal cancels only the wait in progress.
        loop = asyncio.get_running_loop()
        self._phase_started = False
        task = loop.create_task(self._unwind())
        self._current = task
        if self._forced:
            self._cancel_phase()
        while True:
            try:
                await asyncio.shield(task)
                return
            except asyncio.CancelledError:
                if task.done():
                    if task.cancelled():
                        return
                    with contextlib.suppress(asyncio.CancelledError):
                        task.result()
                    return
                # we were cancelled, not the task: wait for the rest of the stack anyway
                continue
            except Exception:
                _log.exception("error while shutting down")
                return

    async def _unwind(self) -> None:
        self._phase_started = True
        await self._stack.aclose()

    async def _start(self) -> None:
        app = self.app
        cfg = app.config
        stack = self._stack
        prepare_dirs(cfg)
        metrics = DaemonMetrics(app.registry, app.version)
        self.notifier.notify("STATUS=starting metrics")
        await stack.enter_async_context(open_metrics(cfg.daemon.metrics_address, app.registry))
        self.notifier.notify("STATUS=starting sandbox")
        sandbox = app.sandbox = await stack.enter_async_context(_sandbox.open_sandbox(app))
        if cfg.sandbox.mode == "off":
            _log.warning("sandbox is OFF: build steps run on the host network (development only)")
        self.notifier.notify("STATUS=starting proxy")
        proxy = app.proxy = await stack.enter_async_context(
            _proxy.open_proxy(cfg, app.registry, sandbox)
        )
        stack.push_async_callback(self._close_connections)
        # A build request resolves its Dockerfile's FROM images through it (build/keyed.py).
        app.resolver = await stack.enter_async_context(
            open_resolver(cfg.build, app.registry, proxy)
        )
        self.notifier.notify("STATUS=starting builds")
        builds = app.builds = await stack.enter_async_context(
            _build.open_builds(cfg, app.registry, sandbox=sandbox, proxy=proxy)
        )
        metrics.set_info(builds.toolchain.name)

        listener = _activated_socket(self.sd)
        path: str | None = None
        if listener is None:
            path = cfg.daemon.socket
            listener = bind_control_socket(path, cfg.daemon.socket_group)
        try:
            self.server = ControlServer(app, metrics, listener, path=path, registry=op_table())
        except BaseException:
            listener.close()
            raise
        stack.callback(self.server.stop_listening)
        _log.info(
            "control socket %s%s",
            path or listener.getsockname() or "(unnamed)",
            "" if path else " (socket activation)",
        )

    async def _close_connections(self) -> None:
        # After a second signal no wait is sat out, also one that begins after the signal
        # cancelled an earlier one (say the toolchain's storage upkeep, at its close).
        if self.server is not None:
            await self.server.close_connections(0.0 if self._forced else _REQUEST_GRACE)

    async def _reloader(self) -> None:
        assert self._reload is not None
        while True:
            await self._reload.wait()
            self._reload.clear()
            _log.info("SIGHUP: reloading")
            await builtin.reload_components(self.app)


def run(config: Config, sd: SystemdEnv, *, dev_mode: bool = False) -> int:
    """Run the daemon on uvloop until it stops; returns the exit code."""
    import uvloop

    daemon = Daemon(config, sd, dev_mode=dev_mode)
    try:
        return uvloop.run(daemon.serve())
    except ConfigError as exc:
        _log.error("configuration error: %s", exc.message)
        return EXIT_CONFIG
    except AgentError as exc:
        _log.error("start failed: %s", exc.message)
        status = Notifier(sd.notify_socket)  # the daemon's own notifier is closed by now
        status.notify(f"STATUS=start failed: {exc.message}")
        status.close()
        return EXIT_STARTUP
    except Exception:
        _log.exception("start failed")
        return EXIT_STARTUP
