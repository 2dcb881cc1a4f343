"""cleanup_buildkitd: what a previous daemon's buildkitd left (its process tree by pidfile, RUN
processes re-parented to PID 1 and chrooted under its root, mounts under its root) is gone after
one call; an unrelated process behind a stale pidfile is left alone. Root."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sandbox import cleanup_buildkitd
from tests.infra.sandbox_env import mountinfo, processes_matching

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and chroot need root")


def wait_until(predicate: object, limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)  # polling the process table with a deadline
    return False


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_cleanup_kills_the_tree_and_chrooted_orphans_and_unmounts(
    short_tmp: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    root = short_tmp / "state" / "buildkit"
    rootfs = root / "runc-overlayfs" / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", rootfs / "bin" / "busybox")
    mnt = root / "snapshots" / "1" / "fs"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(root / "snapshots")], check=True)
    marker = f"35{secrets.randbelow(10**6)}"
    # The previous buildkitd (its command line names it) with a child of its own ...
    daemon = subprocess.Popen(
        ["sh", "-c", f"sleep {marker}.1 & wait", "buildkitd", "--root", str(root)],
        start_new_session=True,
    )
    procs.append(daemon)
    # ... and a RUN step that outlived it: re-parented, chrooted into a rootfs under the root.
    orphan = subprocess.Popen(
        ["chroot", str(rootfs), "/bin/busybox", "sleep", f"{marker}.2"], start_new_session=True
    )
    procs.append(orphan)
    # An unrelated process whose pid a stale pidfile of another root happens to name.
    bystander = subprocess.Popen(["sleep", f"{marker}.3"])
    procs.append(bystander)
    assert wait_until(lambda: len(processes_matching(f"sleep {marker}.1", start=True)) == 1)
    pidfile = short_tmp / "buildkitd.pid"
    pidfile.write_text(f"{daemon.pid}\n")
    stale = short_tmp / "other.pid"
    stale.write_text(f"{bystander.pid}\n")
    try:
        cleanup_buildkitd(pidfile, root)
        cleanup_buildkitd(stale, short_tmp / "elsewhere")
    finally:
        for m in (str(root / "snapshots"), str(mnt)):  # only if the cleanup failed to
            subprocess.run(["umount", "-l", m], capture_output=True)
    assert daemon.wait(10) != 0 and orphan.wait(10) != 0
    assert wait_until(lambda: not processes_matching(f"sleep {marker}.1", start=True))
    assert bystander.poll() is None  # left alone
    assert str(root) not in mountinfo()
    assert not pidfile.exists()
    # Nothing to clean: a no-op, no error.
    cleanup_buildkitd(pidfile, root)
