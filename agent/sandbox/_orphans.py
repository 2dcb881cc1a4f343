"""What a previous daemon's buildkitd left behind: its process tree and its mounts.

Inside the sandbox nothing should be left: buildkitd is PID 1 of its own PID namespace and dies
with the daemon (``PR_SET_PDEATHSIG``), and its mounts live in its own mount namespace. This is
the belt to those braces, and the whole cleanup when the sandbox is off (BuildKit v0.11.6 killed
with SIGKILL leaves RUN processes re-parented to PID 1 and overlay mounts under ``--root``: see
``fixtures/toolchain/README.md``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger("agent.sandbox")

_LIBC = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read(f"/proc/{entry.name}/stat")
            if stat:
                out[int(entry.name)] = int(stat[stat.rfind(b")") + 2 :].split()[1])
    return out


def _tree(pid: int, parents: dict[int, int]) -> list[int]:
    out, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def _under(pid: int, root: str, own_mnt: str) -> bool:
    """Whether ``pid`` runs inside ``root``: its root directory or its program lies there, or it
    lives in a mount namespace of its own whose mounts come from under ``root`` (runc's
    ``runc:[2:INIT]`` and the RUN step of a container on a snapshot there, whose root link reads
    ``/``). A shell whose cwd is there is an operator's, not an orphan."""
    for link in ("root", "exe"):
        try:
            target = os.readlink(f"/proc/{pid}/{link}")
        except OSError:
            continue
        if target == root or target.startswith(root + "/"):
            return True
    try:
        mnt = os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return False
    if mnt == own_mnt:
        return False
    # An overlay's super options name its lowerdir/upperdir paths under root.
    return (root + "/").encode() in _read(f"/proc/{pid}/mountinfo")


def kill_pids(pids: list[int], timeout: float = 5.0) -> list[int]:
    """SIGKILL ``pids`` and wait (bounded) until they are gone; returns those still there."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    left = pids
    while left and time.monotonic() < deadline:
        left = [p for p in left if _alive(p)]
        if left:
            time.sleep(0.01)  # the kernel is still tearing them down: a bounded poll
    return left


def _alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    # A zombie is dead; only its parent's wait() can remove it.
    return bool(stat) and stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def mounts_under(root: str) -> list[str]:
    """Mount points at or below ``root`` in this mount namespace, last mounted first (a mount
    stacked over another's parent must go before it)."""
    found = []
    for line in _read("/proc/self/mountinfo").decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        if point == root or point.startswith(root + "/"):
            found.append(point)
    return found[::-1]


def unmount_under(root: str) -> list[str]:
    """Lazily unmount everything at or below ``root``; returns what was unmounted."""
    done: list[str] = []
    for _ in range(8):  # a covered mount becomes reachable once what covers it is gone
        points = mounts_under(root)
        if not points:
            break
        progress = False
        for point in points:
            if _LIBC.umount2(point.encode(), _MNT_DETACH) == 0:
                done.append(point)
                progress = True
        if not progress:
            break
    for point in mounts_under(root):
        log.warning("cannot unmount %s under %s", point, root)
    return done


def cleanup_buildkitd(pidfile: Path, root: Path) -> None:
    """Kill what a previous buildkitd left and unmount everything under its ``--root``.

    Call before starting buildkitd. ``pidfile`` holds the pid the previous daemon wrote (the
    wrapped child's pid); that process and its tree are killed when its command line still names
    ``buildkitd`` or ``root`` (a pid the kernel has since reused for something else is left
    alone). Processes whose root directory or program lies under ``root`` (RUN steps of a
    buildkitd that ran unsandboxed, re-parented to PID 1) are killed too. Then every mount at or
    under ``root`` is unmounted, and the pidfile removed. Blocking, bounded (a few seconds at
    worst); safe when there is nothing to clean.
    """
    rootdir = os.path.realpath(root)
    parents = _parents()
    doomed: set[int] = set()
    try:
        pid = int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = 0
    if pid > 1 and pid != os.getpid() and pid in parents:
        cmdline = _read(f"/proc/{pid}/cmdline")
        if b"buildkitd" in cmdline or rootdir.encode() in cmdline:
            doomed.update(_tree(pid, parents))
    try:
        own_mnt = os.readlink("/proc/self/ns/mnt")
    except OSError:
        own_mnt = ""
    for p in parents:
        if p not in (1, os.getpid()) and _under(p, rootdir, own_mnt):
            doomed.update(_tree(p, parents))
    doomed.discard(os.getpid())
    if doomed:
        left = kill_pids(sorted(doomed))
        log.warning(
            "killed %d process(es) an earlier buildkitd left behind%s",
            len(doomed),
            f" ({len(left)} did not exit: {left})" if left else "",
        )
    unmounted = unmount_under(rootdir)
    if unmounted:
        log.warning(
            "unmounted %d mount(s) an earlier buildkitd left under %s", len(unmounted), root
        )
    with contextlib.suppress(FileNotFoundError):
        Path(pidfile).unlink()
