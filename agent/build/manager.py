"""The build manager: queue, deduplication, cancellation, timeouts, records (DESIGN section 2).

    submit ──▶ same target queued/running? ── yes ─▶ join it (dedupe: one run, every caller
       │                                               streams the same log, gets the same result)
       no
       ▼
    queue full? ── yes ─▶ Busy        slot free ─▶ running ─▶ succeeded | failed | cancelled
       │                                                          | timed_out | interrupted
       ▼
    queued (FIFO, at most max_queued) ─────────────────────────▲

Callers *attach* to a build while they wait for it. A caller that leaves (disconnect, Ctrl-C)
detaches; the build is cancelled only when no caller is left and nobody asked for it detached.
``cancel`` always cancels. A timeout counts running time (not time in the queue). Every state
change is written to the record before anyone hears of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.build import failure
from agent.build import records as rec
from agent.build._metrics import BuildMetrics
from agent.build.buildargs import secret_values
from agent.build.buildlog import BuildLog, SecretScrub
from agent.build.context import HashCache
from agent.build.flow import Flow, Plan
from agent.build.records import BuildRecord, RecordStore
from agent.build.storage import low_on_disk
from agent.build.toolchain import Toolchain
from agent.contracts import RegistryPort
from agent.errors import AgentError, Busy, ErrorDict, InternalError
from agent.limits import Limits
from agent.sandbox import BuildCgroup, Support, create_cgroup

log = logging.getLogger("agent.build")

_CANCEL_MESSAGES = {
    rec.CANCELLED: "the build was cancelled",
    rec.TIMED_OUT: "the build ran out of time",
    rec.INTERRUPTED: "the daemon stopped while the build ran; run the build again",
}


@dataclass
class Build:
    """One queued or running build and everyone waiting on it."""

    id: str
    key: str  # dedupe key: the resolved target
    plan: Plan
    timeout: float
    record: BuildRecord
    log: BuildLog
    scrub: Callable[[str], str]  # the proxy's, plus this build's secret values
    waiters: int = 0
    pinned: bool = False  # someone asked for it with detach: it runs without callers
    phase: str = "queued"
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None
    queued_at: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def state(self) -> str:
        return self.record.state

    def changed(self) -> asyncio.Event:
        """An event set at the next state or phase change."""
        return self._changed

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def progress(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "phase": self.phase}


class BuildManager:
    """Owns every live build. Used from the event loop only."""

    def __init__(
        self,
        *,
        store: RecordStore,
        toolchain: Toolchain,
        proxy: RegistryPort,
        metrics: BuildMetrics,
        max_concurrent: int,
        max_queued: int,
        log_tail_lines: int = 20,
        scrub: Callable[[str], str] = lambda s: s,
        limits: Limits | None = None,
        cgroups: Support | None = None,
    ) -> None:
        self.store = store
        self.limits = limits or Limits()  # the node's ceilings (build.memory_max, ...)
        self.cgroups = cgroups or Support(0, reason="not set up")
        self.toolchain = toolchain
        self.proxy = proxy
        self.metrics = metrics
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.log_tail_lines = log_tail_lines
        self.scrub = scrub
        self.hash_cache = HashCache()
        self._live: dict[str, Build] = {}  # by id
        self._by_key: dict[str, Build] = {}
        self._queue: deque[Build] = deque()
        self._running: set[str] = set()
        self.state: Literal["running", "draining", "stopped"] = "running"
        metrics.watch_storage(lambda: self.toolchain.storage)

    # --- queries --------------------------------------------------------------------------------

    def live(self, build_id: str) -> Build | None:
        return self._live.get(build_id)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._running)

    # --- submission -----------------------------------------------------------------------------

    def submit(
        self,
        *,
        key: str,
        plan: Plan,
        timeout: float,
        record: BuildRecord,
        detach: bool = False,
    ) -> tuple[Build, bool]:
        """The build for ``key``: an existing queued/running one (joined=True) or a new one.
        Takes ownership of ``plan.context_fd`` (closed when the build ends, or at once on a join).
        Raises Busy when the queue is full; the caller then still owns the fd (closing it here
        too made the caller's close a double close, hitting another request's reused fd)."""
        existing = self._by_key.get(key)
        if existing is not None and existing.state in (rec.QUEUED, rec.RUNNING):
            _close(plan.context_fd)
            existing.pinned = existing.pinned or detach
            existing.record.callers = (existing.record.callers or 1) + 1
            self._add_owner(existing, record)
            self.metrics.dedupe_joins.inc()
            existing.log.line(f"[build-agent] another request for {key} joined this build")
            log.info("build %s: a request joined (dedupe)", existing.id)
            return existing, True
        free_slot = len(self._running) < self.max_concurrent
        if not free_slot and len(self._queue) >= self.max_queued:
            self.metrics.busy.inc()
            raise Busy(
                f"the build queue is full ({len(self._running)} running, {len(self._queue)} "
                f"queued, build.max_queued = {self.max_queued}); try again later",
                details={"running": len(self._running), "queued": len(self._queue)},
            )
        build_log: BuildLog | None = None
        try:
            masked = [*plan.secrets.values(), *secret_values(plan.build_args)]
            scrub = SecretScrub(self.scrub, masked) if masked else self.scrub
            build_log = BuildLog(self.store.log_path(record.id), scrub)
            record = self.store.create(record)
        except OSError as exc:  # ENOSPC, EROFS, EIO: the caller gets why, not an internal error
            if build_log is not None:
                build_log.close()
                with contextlib.suppress(OSError):
                    self.store.log_path(record.id).unlink()
            raise InternalError(
                f"cannot record the build under {self.store.dir}: {exc.strerror or exc}; "
                "free space on that filesystem (daemon.state_dir), then build again",
                details={"errno": exc.errno},
            ) from exc
        build = Build(
            id=record.id,
            key=key,
            plan=plan,
            timeout=timeout,
            record=record,
            log=build_log,
            scrub=scrub,
            pinned=detach,
        )
        self._live[build.id] = build
        self._by_key[key] = build
        self._queue.append(build)
        self.metrics.queued.set(len(self._queue))
        log.info("build %s queued for %s", build.id, self.scrub(key))
        self._pump()
        return build, False

    def _add_owner(self, build: Build, request_record: BuildRecord) -> None:
        """Whoever joins a build owns it too (agent.build.ownership); recorded at once so that
        it holds after a restart."""
        added = [uid for uid in request_record.owners if build.record.add_owner(uid)]
        if added:
            try:
                self.store.save(build.record)
            except OSError as exc:  # kept in memory; the next transition writes it again
                log.error("build %s: cannot record a new owner: %s", build.id, exc)

    def attach(self, build: Build) -> None:
        build.waiters += 1

    def detach(self, build: Build) -> None:
        """A caller left. The last one leaving an unpinned build cancels it."""
        build.waiters = max(0, build.waiters - 1)
        if build.waiters == 0 and not build.pinned and build.state in (rec.QUEUED, rec.RUNNING):
            log.info("build %s: the last caller left; cancelling", build.id)
            self.stop(build, rec.CANCELLED, "every caller left")

    def cancel(self, build_id: str, who: str = "") -> dict[str, Any]:
        """The ``cancel`` op: always cancels a queued or running build."""
        build = self._live.get(build_id)
        if build is None:
            return self.store.get(build_id).result()  # NotFound when unknown; finished: as is
        self.stop(build, rec.CANCELLED, f"cancelled by {who}" if who else "cancelled")
        return build.progress()

    def stop(self, build: Build, reason: str, why: str = "") -> None:
        if build.stop_reason is not None or build.state not in (rec.QUEUED, rec.RUNNING):
            return
        build.stop_reason = reason
        if why:
            build.log.line(f"[build-agent] stopping: {why}")
        if build.state == rec.QUEUED:
            with contextlib.suppress(ValueError):
                self._queue.remove(build)
            self.metrics.queued.set(len(self._queue))
            self._finish(build, reason, error=self._stop_error(build, reason, why))
        elif build.task is not None:
            build.task.cancel()

    def _stop_error(self, build: Build, reason: str, why: str) -> ErrorDict:
        code = {rec.TIMED_OUT: "timed_out", rec.CANCELLED: "cancelled"}.get(reason, "internal")
        message = _CANCEL_MESSAGES[reason]
        if reason == rec.TIMED_OUT:
            message = (
                f"the build ran out of time after {build.timeout:g}s (timeout); "
                "raise --timeout or build.timeout"
            )
        elif why:
            message = f"{message} ({why})"
        return {"code": code, "message": message, "details": {"phase": build.phase}}

    # --- running --------------------------------------------------------------------------------

    def _pump(self) -> None:
        while self._queue and len(self._running) < self.max_concurrent:
            build = self._queue.popleft()
            self._running.add(build.id)
            build.task = asyncio.get_running_loop().create_task(
                self._run(build), name=f"build {build.id}"
            )
        self.metrics.queued.set(len(self._queue))
        self.metrics.active.set(len(self._running))

    async def _run(self, build: Build) -> None:
        try:
            await self._run_flow(build)
        except BaseException:
            # Whatever broke (a record that cannot be written, say): no caller may wait forever.
            if not build.done.is_set():
                log.exception("build %s: could not be run to its end", build.id)
                if build.record.done:  # it broke after its final transition: only release it
                    self._release(build)
                else:
                    err = InternalError("the build could not be recorded; see the daemon log")
                    self._finish(build, rec.FAILED, error=self._error_dict(build, err))
            raise

    async def _run_flow(self, build: Build) -> None:
        if build.done.is_set():  # stopped while queued, after _pump gave it its task
            return
        queued_for = time.monotonic() - build.queued_at
        self.metrics.phase.labels("queue").observe(queued_for)
        self.store.transition(build.record, rec.RUNNING)
        self.metrics.started.inc()
        build.notify()
        log.info("build %s running", build.id)
        timer = asyncio.get_running_loop().call_later(build.timeout, self._expire, build)
        t0 = time.monotonic()
        try:
            state, outcome, error = await self._flow(build)
        finally:
            timer.cancel()
        timings = outcome.setdefault("timings", {})
        timings["queue"] = round(queued_for, 4)
        timings["total"] = round(time.monotonic() - t0, 4)
        self.metrics.phase.labels("total").observe(time.monotonic() - t0)
        if error is not None:  # scrubbed again: errors quote tool output
            error["message"] = build.scrub(error["message"])
        self._finish(build, state, error=error, outcome=outcome)

    async def _flow(self, build: Build) -> tuple[str, dict[str, Any], ErrorDict | None]:
        """Run the build's flow: its final state, its outcome (flow.Outcome) and its error."""

        def phase(name: str) -> None:
            build.phase = name
            build.notify()

        cgroup = await self._open_cgroup(build)
        flow = Flow(
            self.proxy,
            self.toolchain,
            self.metrics,
            sink=build.log,
            phase=phase,
            staging=str(self.store.dir.parent / "contexts"),
            cgroup=cgroup,
        )
        state, out_of_disk = rec.FAILED, False
        try:
            try:
                outcome = await flow.run(build.plan)
            except AgentError as exc:
                full = failure.out_of_disk(exc, self.toolchain.storage)
                if full is not None:
                    out_of_disk = True
                    raise full from exc
                raise failure.limited(exc, cgroup, self.toolchain.steps_in_build_cgroup) from exc
            finally:
                if cgroup is not None:  # kills what is left of the build's processes
                    await asyncio.shield(asyncio.to_thread(cgroup.remove))
            state = rec.SUCCEEDED
            return state, outcome.to_dict(), None
        except asyncio.CancelledError:
            state = build.stop_reason or rec.INTERRUPTED
            return state, flow.outcome.to_dict(), self._stop_error(build, state, "")
        except AgentError as exc:
            return rec.FAILED, flow.outcome.to_dict(), self._error_dict(build, exc)
        except Exception as exc:
            log.exception("build %s: internal error", build.id)
            err = InternalError(f"internal error while building: {exc!r}; see the daemon log")
            return rec.FAILED, flow.outcome.to_dict(), self._error_dict(build, err)
        finally:
            # A full disk is also checked on the disk: a RUN step can print the words.
            self.toolchain.after_build(
                failed=state != rec.SUCCEEDED,
                disk_full=out_of_disk and low_on_disk(self.toolchain.storage),
            )

    async def _open_cgroup(self, build: Build) -> BuildCgroup | None:
        limits = build.plan.limits
        if self.cgroups.version == 0 or limits == Limits():
            return None
        try:
            return await asyncio.to_thread(
                create_cgroup,
                self.cgroups,
                build.id,
                memory_max=limits.memory_max,
                pids_max=limits.pids_max,
                cpu_max=limits.cpu_max,
            )
        except OSError as exc:
            log.warning("build %s: no cgroup, runs without limits: %s", build.id, exc)
            build.log.line(f"[build-agent] warning: the build runs without its limits ({exc})")
            return None

    def _error_dict(self, build: Build, exc: AgentError) -> ErrorDict:
        details = {
            k: build.scrub(v) if isinstance(v, str) else v
            for k, v in exc.details.items()
            if k != "log_tail"
        }
        details["log_tail"] = build.log.tail(self.log_tail_lines)  # scrubbed when logged
        return {"code": exc.code, "message": build.scrub(exc.message), "details": details}

    def _expire(self, build: Build) -> None:
        self.stop(build, rec.TIMED_OUT, f"timeout of {build.timeout:g}s reached")

    def _finish(
        self,
        build: Build,
        state: str,
        *,
        error: ErrorDict | None = None,
        outcome: dict[str, Any] | None = None,
    ) -> None:
        """Record the final state, then release the build's callers and resources."""
        outcome = dict(outcome or {})
        outcome.setdefault("target_ref", build.record.target_ref or "")
        try:
            self.store.transition(build.record, state, error=error, outcome=outcome)
        except OSError as exc:
            # The callers still get the outcome (the record in memory moved); the record on
            # disk stays at its last state and is marked interrupted by the next start.
            log.error("build %s: cannot write its record: %s", build.id, exc)
        self._release(build)

    def _release(self, build: Build) -> None:
        """A finished build: its last log line, fds and secrets gone, its callers told."""
        state = build.record.state
        err = build.record.error
        if err:
            build.log.line(f"[build-agent] {state}: {err['message']}")
        else:
            build.log.line(
                f"[build-agent] {state}: {build.record.target_ref}@{build.record.digest}"
            )
        build.log.close()
        _close(build.plan.context_fd)
        build.plan.context_fd = None
        # Secret values live no longer than the build: not for the record's lifetime.
        build.plan.secrets = {}
        if isinstance(build.scrub, SecretScrub):
            build.scrub.forget()
        self._running.discard(build.id)
        self._live.pop(build.id, None)
        if self._by_key.get(build.key) is build:
            del self._by_key[build.key]
        self.metrics.finished.labels(state).inc()
        log.info("build %s %s", build.id, state)
        build.phase = state
        build.done.set()
        build.notify()
        self._pump()

    # --- shutdown -------------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Let running builds finish for ``grace`` seconds; then stop everything as interrupted."""
        self.state = "draining"
        for build in list(self._queue):
            self.stop(build, rec.INTERRUPTED, "the daemon is shutting down")
        running = [b.task for b in self._live.values() if b.task is not None]
        if running:
            log.info("waiting up to %gs for %d running builds", grace, len(running))
            await asyncio.wait(running, timeout=grace)
        tasks = []
        for build in list(self._live.values()):
            self.stop(build, rec.INTERRUPTED, "the daemon is shutting down")
            if build.task is not None:
                tasks.append(build.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.state = "stopped"


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


__all__ = ["Build", "BuildManager"]
