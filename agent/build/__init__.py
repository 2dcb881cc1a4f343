"""Builds: manager, records, logs, toolchains (DESIGN section 2).

handlers.py   the control ops (build, status, list, logs, cancel); request.py checks a build's args
manager.py    queue, dedupe, cancellation, timeouts, records -> flow.py (one build's steps);
              failure.py turns a failure into the callers' error
context.py    the context by fd: content key, .dockerignore (dockerignore.py), permissions
records.py    records on disk (atomic), retention;  buildlog.py  live logs and followers
toolchain.py  the toolchain interface; buildah.py and buildkit.py implement it
storage.py    the toolchain's store: size, budget, upkeep (buildah_store.py, buildkit_store.py)
child.py      every child process (scrubbed env, own session, tree kill)
ownership.py  who may read and cancel a build;  buildargs.py  build-arg values off the argv
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from agent.config import Config
from agent.contracts import RegistryPort, SandboxPort
from agent.limits import Limits, parse_bytes
from agent.sandbox import (
    BuildCgroup,
    Support,
    create_cgroup,
    detect_cgroups,
    release_cgroups,
    sweep_cgroups,
)

if TYPE_CHECKING:
    from agent.build.manager import BuildManager
    from agent.build.toolchain import Toolchain

log = logging.getLogger("agent.build")

_RETENTION_EVERY = 3600.0


def buildkit_available() -> bool:
    """True when buildkitd, buildctl and crane are all found (PATH or AGENT_BUILDKITD etc.)."""
    from agent.build.buildkit import buildkit_binaries

    return buildkit_binaries() is not None


def choose_toolchain(setting: str) -> str:
    if setting == "auto":
        return "buildkit" if buildkit_available() else "buildah"
    return setting


def _make_toolchain(
    config: Config,
    registry: CollectorRegistry,
    name: str,
    sandbox: SandboxPort,
    proxy: RegistryPort,
    steps_cgroup: BuildCgroup | None = None,
) -> Toolchain:
    if name == "buildkit":
        from agent.build.buildkit import BuildkitToolchain

        return BuildkitToolchain(
            state_dir=config.daemon.state_dir,
            runtime_dir=config.daemon.runtime_dir,
            registry=registry,
            sandbox=sandbox,
            proxy=proxy,
            log_tail_lines=config.build.log_tail_lines,
            cache_repo=config.build.cache_repo,
            steps_cgroup=steps_cgroup,
            storage_max=parse_bytes(config.build.storage_max),
        )
    from agent.build.buildah import BuildahToolchain

    return BuildahToolchain(
        state_dir=config.daemon.state_dir,
        sandbox=sandbox,
        log_tail_lines=config.build.log_tail_lines,
        storage_max=parse_bytes(config.build.storage_max),
        driver=config.build.buildah_driver,
    )


@asynccontextmanager
async def open_builds(
    config: Config, registry: CollectorRegistry, *, sandbox: SandboxPort, proxy: RegistryPort
) -> AsyncIterator[BuildManager]:
    """Start the toolchain and the build manager (``manager.toolchain``); on exit, drain within
    the grace period."""
    from agent.build._metrics import BuildMetrics
    from agent.build.manager import BuildManager
    from agent.build.records import RecordStore

    store = RecordStore(config.daemon.state_dir)
    # Context copies of builds a stopped daemon was running (flow.Flow._stage makes them). The
    # directory itself stays: the sandbox hides it from children that start from now on.
    contexts = Path(config.daemon.state_dir) / "contexts"
    for leftover in contexts.iterdir() if contexts.is_dir() else ():
        shutil.rmtree(leftover, ignore_errors=True)
    interrupted = store.load()
    if interrupted:
        log.warning("marked %d builds interrupted: %s", len(interrupted), ", ".join(interrupted))
    retention = config.build.retention_days * 86400.0
    store.prune(max_age=retention, max_count=config.build.retention_count)
    name = choose_toolchain(config.build.toolchain)
    b = config.build
    limits = Limits.from_config(b.memory_max, b.pids_max, b.cpu_max)
    cgroups = await _cgroups(cgroup_instance(config.daemon.state_dir))
    steps = await _steps_cgroup(cgroups, limits, config.build.max_concurrent_builds, name)
    toolchain = _make_toolchain(config, registry, name, sandbox, proxy, steps)
    try:
        await toolchain.start()
    except BaseException:
        if steps is not None:
            steps.remove()
        raise
    log.info("toolchain %s (build.toolchain = %s)", name, config.build.toolchain)
    manager = BuildManager(
        store=store,
        toolchain=toolchain,
        proxy=proxy,
        metrics=BuildMetrics(registry),
        max_concurrent=config.build.max_concurrent_builds,
        max_queued=config.build.max_queued,
        log_tail_lines=config.build.log_tail_lines,
        scrub=proxy.scrub,
        limits=limits,
        cgroups=cgroups,
    )

    async def prune_forever() -> None:
        while True:
            await asyncio.sleep(_RETENTION_EVERY)
            store.prune(max_age=retention, max_count=config.build.retention_count)

    pruner = asyncio.get_running_loop().create_task(prune_forever(), name="build retention")
    try:
        yield manager
    finally:
        pruner.cancel()
        await manager.drain(config.daemon.shutdown_grace)
        await toolchain.close()
        if steps is not None:  # after buildkitd: whatever of its steps is left dies with it
            steps.remove()  # blocking, bounded; inline like the release below
        # A few rmdirs, done inline: no await point in the stop path (a second signal cancels
        # the wait in progress, and the daemon must then exit at once).
        release_cgroups(cgroups)
        with contextlib.suppress(Exception):
            store.prune(max_age=retention, max_count=config.build.retention_count)


__all__ = ["buildkit_available", "choose_toolchain", "open_builds"]


async def _steps_cgroup(
    support: Support, limits: Limits, concurrent: int, toolchain: str
) -> BuildCgroup | None:
    """BuildKit's RUN steps, all builds together: one cgroup (``buildkit``) limited to the
    per-build limits times ``build.max_concurrent_builds``. A per-build one is not possible:
    BuildKit puts a step's cgroup parent into the step's cache key."""
    if toolchain != "buildkit" or support.version == 0 or limits == Limits():
        return None

    def times(v: float | None) -> Any:
        return None if v is None else type(v)(v * concurrent)

    try:
        cg = await asyncio.to_thread(
            create_cgroup,
            support,
            "buildkit",
            memory_max=times(limits.memory_max),
            pids_max=times(limits.pids_max),
            cpu_max=times(limits.cpu_max),
        )
    except OSError as exc:
        log.warning("BuildKit's RUN steps run without limits: %s", exc)
        return None
    if cg is not None:
        cg.who = "BuildKit's RUN steps (all builds on the node together)"
        cg.shared = True
        log.info(
            "BuildKit's RUN steps share a cgroup with %s",
            Limits(cg.memory_max, cg.pids_max, cg.cpu_max).words(),
        )
    return cg


def cgroup_instance(state_dir: str) -> str:
    """This daemon's name among the build cgroups of the host: two daemons (two state dirs) never
    sweep or kill each other's builds."""
    return "d-" + hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:12]


async def _cgroups(instance: str) -> Support:
    """The node's cgroups for per-build limits, a crashed daemon's build cgroups removed; loud
    when there are none (builds still run, unlimited)."""
    support = await asyncio.to_thread(detect_cgroups, instance)
    if support.version == 0:
        log.warning(
            "per-build limits are NOT applied (%s): builds run without memory, process or CPU "
            "limits",
            support.reason,
        )
        return support
    left = await asyncio.to_thread(sweep_cgroups, support)
    if left:
        log.warning("removed %d build cgroup(s) an earlier daemon left", left)
    log.info("per-build limits with %s", support.words())
    return support
