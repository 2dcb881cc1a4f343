"""Containers a stopped buildah left to its OCI runtime.

buildah runs each RUN step as a runc container and deletes it when the step ends. A buildah
killed mid-step (cancel, timeout, a killed daemon) leaves the container's runc state and its
cgroups behind (with the sandbox off, its processes too). Each build gives runc a state
directory of its own (``--runtime-flag root=<work>/runc``), so what one build left is found and
deleted (``runc delete --force``: kills what still runs, removes the cgroups and the state)
without touching anyone else's containers.

``runc delete`` runs through the sandbox like every child: the pid in a container's state is
one of the sandbox's PID namespace, meaningless on the host (there the sandbox's namespace is
gone with its processes, so runc finds nothing to kill and just cleans up).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path

from agent.build.child import popen
from agent.contracts import SandboxPort

log = logging.getLogger("agent.build")

_DELETE_TIMEOUT = 10.0


def state_dir(work: Path) -> Path:
    """Where runc keeps the state of one build's containers."""
    return work / "runc"


def _leftovers(work: Path) -> list[str]:
    root = state_dir(work)
    try:
        return sorted(e.name for e in root.iterdir() if e.is_dir())
    except OSError:
        return []


def _argv(runtime: str, work: Path, container: str) -> list[str]:
    return [runtime, "--root", str(state_dir(work)), "delete", "--force", container]


async def delete_leftovers(
    runtime: str, work: Path, sandbox: SandboxPort, env: Mapping[str, str]
) -> None:
    """Delete the containers of the build whose work directory is ``work`` (none, normally)."""
    for container in _leftovers(work):
        log.warning("deleting container %s a stopped buildah left to %s", container, runtime)
        argv = sandbox.wrap(_argv(runtime, work, container), visible=(str(work),))
        child = await popen("runc delete", argv, env=env, stdout=subprocess.DEVNULL)
        try:
            await asyncio.wait_for(child.wait(), _DELETE_TIMEOUT)
        except TimeoutError:
            log.warning("runc delete of container %s did not finish; killed", container)
            await child.stop(grace=0)


def delete_leftovers_now(
    runtime: str, work: Path, sandbox: SandboxPort, env: Mapping[str, str]
) -> None:
    """:func:`delete_leftovers`, blocking (at start, before any build runs)."""
    for container in _leftovers(work):
        log.warning("deleting container %s an earlier daemon's buildah left", container)
        argv = sandbox.wrap(_argv(runtime, work, container), visible=(str(work),))
        try:
            subprocess.run(
                argv,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=_DELETE_TIMEOUT,
                check=False,
                start_new_session=True,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("could not delete container %s: %s", container, exc)


__all__ = ["delete_leftovers", "delete_leftovers_now", "state_dir"]
