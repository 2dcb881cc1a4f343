"""Supervision of one long-running child (buildkitd): an explicit state machine.

    STOPPED ──start──▶ STARTING ──probe ok──▶ RUNNING
                          │  ▲                   │
         exited / probe   │  │ delay elapsed     │ exited
         timed out        ▼  │                   ▼
                         BACKOFF ◀───────────────┘
                          │
                          └── N quick failures in a row ──▶ FATAL ──start──▶ STARTING

    any state except STOPPED ──stop──▶ STOPPED

Every move goes through :meth:`Supervisor._to`, which checks it against :data:`TRANSITIONS` and
raises :class:`IllegalTransition` otherwise (the same idea as Supervisor's ``ProcessStates`` and
h11's transition table). RUNNING is entered only after the readiness probe succeeded. An exit
counts as *quick* when the child never became ready or died within ``quick_window`` seconds of
becoming ready; ``max_quick_failures`` quick exits in a row end in FATAL. The delay before a restart
doubles per quick failure from ``backoff_base`` up to ``backoff_cap``, minus up to ``jitter`` of it
(so a fleet of nodes does not restart in lockstep).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.build.child import Child, describe_exit, output_lines
from agent.errors import AgentError, IllegalTransition

log = logging.getLogger("agent.build")


class State(enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.RUNNING, State.BACKOFF, State.STOPPED}),
    State.RUNNING: frozenset({State.BACKOFF, State.STOPPED}),
    State.BACKOFF: frozenset({State.STARTING, State.FATAL, State.STOPPED}),
    State.FATAL: frozenset({State.STARTING, State.STOPPED}),
}


@dataclass(frozen=True)
class Policy:
    """Timing of a supervised child. The defaults suit buildkitd on a build node."""

    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    jitter: float = 0.2  # fraction of the delay that may be taken off at random
    quick_window: float = 10.0  # an exit within this many seconds of RUNNING counts as quick
    max_quick_failures: int = 5
    ready_timeout: float = 60.0  # STARTING longer than this counts as a failed start
    probe_interval: float = 0.1  # first retry of the probe; grows to 1 s
    stop_grace: float = 10.0  # SIGTERM, then SIGKILL after this long

    def delay(self, quick_failures: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before the next start after ``quick_failures`` quick exits in a row."""
        base = min(self.backoff_cap, self.backoff_base * 2 ** max(0, quick_failures - 1))
        return float(base * (1.0 - self.jitter * rand()))


Launch = Callable[[], Awaitable[Child]]
Probe = Callable[[Child], Awaitable[bool]]


class _Metrics:
    """The child series, shared by every supervisor on one CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "build_agent_child_up",
            "1 while a supervised child is RUNNING (ready), else 0",
            ["child"],
            registry=registry,
        )
        self.restarts = Counter(
            "build_agent_child_restarts",
            "Times a supervised child was started again after it exited or failed to start",
            ["child"],
            registry=registry,
        )
        self.state = Gauge(
            "build_agent_buildkitd_state",
            "Supervisor state of a child: 1 for the current state, 0 for the others",
            ["child", "state"],
            registry=registry,
        )


_metrics_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = (
    weakref.WeakKeyDictionary()
)


def _metrics(registry: CollectorRegistry) -> _Metrics:
    m = _metrics_by_registry.get(registry)
    if m is None:
        m = _metrics_by_registry[registry] = _Metrics(registry)
    return m


class Supervisor:
    """Keeps one child running: start, probe, restart with backoff, give up in FATAL.

    ``launch`` starts the child (via :func:`agent.build.child.spawn`); ``probe`` answers whether
    the started child is ready. Neither is called concurrently with itself.
    """

    def __init__(
        self,
        name: str,
        *,
        launch: Launch,
        probe: Probe,
        registry: CollectorRegistry,
        policy: Policy | None = None,
        after_exit: Callable[[], Awaitable[None]] | None = None,
        scrub: Callable[[str], str] = lambda s: s,
    ) -> None:
        self.name = name
        self._scrub = scrub  # applied to every line the child prints before it is kept or logged
        self.policy = policy or Policy()
        self._launch = launch
        self._probe = probe
        self._after_exit = after_exit
        self._state = State.STOPPED
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.child: Child | None = None
        self.quick_failures = 0
        self.restarts = 0
        self.last_exit = ""  # "exited with status 1", for error messages
        self.output: deque[str] = deque(maxlen=40)  # last lines the child printed
        self.history: deque[tuple[float, State]] = deque(maxlen=64)  # (monotonic, state)
        self._m = _metrics(registry)
        self._m.up.labels(name).set(0)
        self._m.restarts.labels(name)
        self._publish()

    @property
    def state(self) -> State:
        return self._state

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    # --- transitions ------------------------------------------------------------------------

    def _to(self, new: State) -> None:
        old = self._state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(
                f"{self.name}: transition {old.value} -> {new.value} is not allowed",
                details={"from": old.value, "to": new.value},
            )
        self._state = new
        self.history.append((time.monotonic(), new))
        self._publish()
        pid = self.pid
        log.info("%s: %s -> %s (pid %s)", self.name, old.value, new.value, pid if pid else "none")
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _publish(self) -> None:
        for s in State:
            self._m.state.labels(self.name, s.value).set(1 if s is self._state else 0)
        self._m.up.labels(self.name).set(1 if self._state is State.RUNNING else 0)

    # --- public -----------------------------------------------------------------------------

    def start(self) -> None:
        """Begin supervising (from STOPPED or FATAL). Returns at once; see :meth:`wait_ready`."""
        if self._task is not None and not self._task.done():
            return
        self.quick_failures = 0
        self._to(State.STARTING)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def wait_ready(self, within: float) -> State:
        """Wait up to ``within`` s until RUNNING or FATAL (or STOPPED); return the state then."""
        final = (State.RUNNING, State.FATAL, State.STOPPED)
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self._state in final), within)
        return self._state

    async def wait_state(self, state: State, within: float) -> bool:
        return await self.wait_until(lambda: self._state is state, within)

    async def wait_until(self, predicate: Callable[[], bool], within: float) -> bool:
        """Wait up to ``within`` s for ``predicate()`` to hold after some transition."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), within)
            except TimeoutError:
                return False
        return True

    async def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after the grace) and end in STOPPED."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._state is not State.STOPPED:
            self._to(State.STOPPED)
        self.child = None

    # --- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                if self._state is not State.STARTING:
                    self._to(State.STARTING)
                await self._one_life()
                if self.quick_failures >= self.policy.max_quick_failures:
                    self._to(State.FATAL)
                    log.error(
                        "%s: gave up after %d failed starts in a row (last: %s); "
                        "fix the cause (see its output above) and reload the daemon",
                        self.name,
                        self.quick_failures,
                        self.last_exit,
                    )
                    return
                delay = self.policy.delay(max(1, self.quick_failures))
                log.info("%s: restarting in %.2fs", self.name, delay)
                await asyncio.sleep(delay)
                self.restarts += 1
                self._m.restarts.labels(self.name).inc()
        except asyncio.CancelledError:
            await asyncio.shield(self._kill_child())
            raise

    async def _one_life(self) -> None:
        """Start the child, wait for readiness, wait for its exit; end in BACKOFF."""
        try:
            child = await self._launch()
        except AgentError as exc:
            self.last_exit = f"could not be started: {exc.message}"
            log.error("%s %s", self.name, self.last_exit)
            self.quick_failures += 1
            self._to(State.BACKOFF)
            return
        self.child = child
        pump = asyncio.get_running_loop().create_task(self._pump(child))
        try:
            why_not = await self._until_ready(child)
            ready_at = time.monotonic()
            if why_not is None:
                self._to(State.RUNNING)
                code = await child.wait()
                self.last_exit = describe_exit(code)
            else:
                if child.returncode is None:
                    await child.stop(grace=1.0)
                    self.last_exit = why_not
                else:
                    self.last_exit = describe_exit(child.returncode)
            # The child is gone: its output ends soon (unless a grandchild holds the pipe).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pump), 1.0)
        finally:
            pump.cancel()
        if self._after_exit is not None:
            await self._after_exit()
        lived = time.monotonic() - ready_at
        if why_not is None and lived >= self.policy.quick_window:
            self.quick_failures = 0
        else:
            self.quick_failures += 1
        log.warning(
            "%s (pid %d) %s%s",
            self.name,
            child.pid,
            self.last_exit,
            f" after {lived:.1f}s" if why_not is None else " before it became ready",
        )
        self._to(State.BACKOFF)

    async def _until_ready(self, child: Child) -> str | None:
        """None once the probe succeeds; otherwise why the child is not ready."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.policy.ready_timeout
        interval = self.policy.probe_interval
        exited: asyncio.Future[Any] = loop.create_task(child.wait())
        try:
            while time.monotonic() < deadline:
                if exited.done():
                    return "exited before it became ready"
                probe: asyncio.Future[Any] = asyncio.ensure_future(self._probe(child))
                try:
                    done, _ = await asyncio.wait(
                        {probe, exited}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    if not probe.done():
                        probe.cancel()
                        with contextlib.suppress(asyncio.CancelledError, AgentError):
                            await probe
                if probe in done and not probe.cancelled() and probe.result():
                    return None
                left = deadline - time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exited), max(0.0, min(interval, left)))
                interval = min(1.0, interval * 2)
            return f"was not ready after {self.policy.ready_timeout:g}s"
        finally:
            if not exited.done():
                exited.cancel()

    async def _pump(self, child: Child) -> None:
        if child.stdout is None:
            return
        async for line in output_lines(child.stdout):
            text = self._scrub(line)
            self.output.append(text)
            if "level=error" in text or "level=fatal" in text or "level=panic" in text:
                log.warning("%s: %s", self.name, text)
            elif "level=warning" in text:
                log.info("%s: %s", self.name, text)
            else:
                log.debug("%s: %s", self.name, text)

    async def _kill_child(self) -> None:
        child = self.child
        if child is not None and child.returncode is None:
            code = await child.stop(grace=self.policy.stop_grace)
            log.info("%s (pid %d) stopped: %s", self.name, child.pid, describe_exit(code))
