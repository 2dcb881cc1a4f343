"""The per-child sandbox entry: ``python -I -S _exec.py [options] -- argv...``.

Runs on every child start, so it imports only the standard library (``-S``: no site-packages) and
does its work with a handful of system calls:

1. ``--parent PID``: die with the daemon (``PR_SET_PDEATHSIG``), so a SIGKILLed daemon leaves no
   child behind; if the daemon is already gone, exit.
2. ``--netns PATH``: ``setns`` into the sandbox's network namespace.
3. ``--pid``: ``unshare(CLONE_NEWPID)`` and fork; the fork is PID 1 of a fresh PID namespace and
   this process stays outside as its supervisor (forwards signals, exits with the same status).
   When PID 1 dies the kernel kills everything else in the namespace.
4. ``unshare(CLONE_NEWNS)`` + private propagation: mounts made from here on (ours and the
   child's) never reach the host and vanish with the last process of the namespace.
5. ``--readonly DIR`` (a read-only copy of its mount tree over it, submounts included:
   ``open_tree`` + ``mount_setattr``; a plain bind remounted read-only on kernels before 5.12),
   ``--keep DIR`` (taken before hiding, with ``open_tree``), ``--hide DIR`` (an empty read-only
   tmpfs over it, then each kept directory under it moved back in), ``--hide-file FILE``
   (``/dev/null`` bound over it, read-only).
6. Capabilities no builder needs (loading kernel modules, raw I/O, reboot, setting the clock...)
   leave the bounding set: :data:`DROP_CAPS`.
7. With ``--pid``: a new ``/proc`` for the new PID namespace. Then ``execvp(argv)``.

A step the kernel refuses ends the helper with status 125 and one line on stderr naming the step:
``build-agent sandbox: <step> failed: <reason>``; the daemon's start probe turns it into a
StartupError.
"""

from __future__ import annotations

import ctypes
import os
import select
import sys

# The C module: ``signal`` would import enum, a few ms on every child start.
signal = __import__("_signal")

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
# Capabilities no builder needs (not buildah, buildkitd/runc, nor their default RUN capability
# sets): dropped from the bounding set, so neither a child nor anything it runs can get them back.
# sys_module 16, sys_rawio 17, sys_pacct 20, sys_boot 22, sys_time 25, audit_control 30,
# mac_override 32, mac_admin 33, syslog 34, wake_alarm 35, block_suspend 36.
DROP_CAPS = (16, 17, 20, 22, 25, 30, 32, 33, 34, 35, 36)
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
SYS_OPEN_TREE = 428  # the same number on every architecture (new syscall table, Linux 5.2)
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
ENOSYS = 38
FAILED = 125
EINVAL = 22
# Signals forwarded to the namespace's PID 1 (the rest are not meant for it, or cannot be caught).
FORWARD = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

libc = ctypes.CDLL(None, use_errno=True)


class Refused(Exception):
    """A system call of the sandbox set-up failed."""


def fail(step: str, err: int) -> Refused:
    return Refused(f"{step} failed: {os.strerror(err)}")


def check(rc: int, step: str) -> int:
    if rc < 0:
        raise fail(step, ctypes.get_errno())
    return rc


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    rc = libc.mount(
        src.encode() if src is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        ctypes.c_ulong(flags),
        data.encode() if data is not None else None,
    )
    check(rc, f"mount {fstype or 'flags'} on {target}")


def parse(args: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    opts: dict[str, list[str]] = {"--hide": [], "--hide-file": [], "--keep": [], "--readonly": []}
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return opts, args[i + 1 :]
        if a == "--pid":
            opts["--pid"] = []
            i += 1
            continue
        takes_value = ("--netns", "--parent", "--hide", "--hide-file", "--keep", "--readonly")
        if a in takes_value and i + 1 < len(args):
            opts.setdefault(a, []).append(args[i + 1])
            i += 2
            continue
        raise Refused(f"bad option {a!r}")
    raise Refused("no '--' before the command")


def die_with(parent: int) -> None:
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        raise Refused(f"the daemon (pid {parent}) is gone")


def enter_netns(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise fail(f"open network namespace {path}", exc.errno or 0) from exc
    try:
        check(libc.setns(fd, CLONE_NEWNET), f"setns into {path}")
    finally:
        os.close(fd)


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def make_readonly(path: str) -> None:
    """A read-only copy of the mount tree at ``path`` (every submount too) over ``path``."""
    fd = check(
        libc.syscall(
            SYS_OPEN_TREE,
            AT_FDCWD,
            path.encode(),
            ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE),
        ),
        f"open_tree {path}",
    )
    try:
        attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
        rc = libc.syscall(
            SYS_MOUNT_SETATTR,
            fd,
            b"",
            ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        if rc < 0 and ctypes.get_errno() == ENOSYS:  # before Linux 5.12: the top mount only
            mount(path, path, None, MS_BIND | MS_REC, None)
            mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
            return
        check(rc, f"mount_setattr read-only {path}")
        rc = libc.syscall(
            SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, path.encode(), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)
        )
        check(rc, f"move_mount onto {path}")
    finally:
        os.close(fd)


def hide(dirs: list[str], files: list[str], keeps: list[str], readonly: list[str]) -> None:
    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    for r in readonly:
        if os.path.isdir(r):
            make_readonly(r)
    kept: list[tuple[str, int]] = []
    for k in keeps:
        if os.path.isdir(k):
            fd = libc.syscall(
                SYS_OPEN_TREE,
                AT_FDCWD,
                k.encode(),
                ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE),
            )
            kept.append((k, check(fd, f"open_tree {k}")))
    sealed = MS_NOSUID | MS_NODEV | MS_NOEXEC
    for d in sorted(set(dirs), key=len):  # parents first; a hidden child of theirs is gone
        if not os.path.isdir(d):
            continue
        mount("tmpfs", d, "tmpfs", sealed, "size=64k,mode=0755")
        for k, fd in kept:
            if k.startswith(d.rstrip("/") + "/"):
                os.makedirs(k, exist_ok=True)
                rc = libc.syscall(
                    SYS_MOVE_MOUNT,
                    fd,
                    b"",
                    AT_FDCWD,
                    k.encode(),
                    ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
                )
                check(rc, f"move_mount onto {k}")
        mount("tmpfs", d, "tmpfs", MS_REMOUNT | MS_RDONLY | sealed, "size=64k,mode=0755")
    for _, fd in kept:
        os.close(fd)
    for f in files:
        if os.path.lexists(f) and not os.path.isdir(f):
            mount("/dev/null", f, None, MS_BIND, None)
            mount(None, f, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)


def drop_caps() -> None:
    for cap in DROP_CAPS:
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            err = ctypes.get_errno()
            if err != EINVAL:  # a capability this kernel does not know
                raise fail(f"prctl(PR_CAPBSET_DROP, {cap})", err)


def supervise(child: int, proc_fd: int) -> None:
    """Stay outside the PID namespace as its PID 1's parent until it ends; exit as it did."""

    def forward(signum: int, _frame: object) -> None:
        # PID 1 of a namespace ignores signals it has no handler for, even from outside; a
        # terminating signal it cannot receive ends the namespace instead, as it would end a
        # process anywhere else.
        try:
            fd = os.open(f"{child}/status", os.O_RDONLY, dir_fd=proc_fd)
            try:
                status = os.read(fd, 4096).decode()
            finally:
                os.close(fd)
        except OSError:
            return
        caught = 0
        for line in status.splitlines():
            if line.startswith("SigCgt:"):
                caught = int(line.split()[1], 16)
        try:
            if caught & (1 << (signum - 1)):
                os.kill(child, signum)
            else:
                os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass

    for s in FORWARD:
        signal.signal(s, forward)
    while True:
        try:
            _, status = os.waitpid(child, 0)
        except ChildProcessError:
            os._exit(FAILED)
        if os.WIFEXITED(status):
            os._exit(os.WEXITSTATUS(status))
        if os.WIFSIGNALED(status):
            # Die of the same signal, so the daemon reads "killed by signal N" for us too.
            sig = os.WTERMSIG(status)
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
            os._exit(128 + sig)


def start(opts: dict[str, list[str]], argv: list[str]) -> None:
    if "--parent" in opts:
        die_with(int(opts["--parent"][0]))
    if "--netns" in opts:
        enter_netns(opts["--netns"][0])
    pid_ns = "--pid" in opts
    if pid_ns:
        proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        check(libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child:
            os.close(alive_r)
            supervise(child, proc_fd)
        os.close(alive_w)
        os.close(proc_fd)
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        if select.select([alive_r], [], [], 0)[0]:  # the supervisor died before prctl took hold
            os._exit(FAILED)
    hide(opts["--hide"], opts["--hide-file"], opts["--keep"], opts["--readonly"])
    drop_caps()
    if pid_ns:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - running the child is this helper's job
    except OSError as exc:
        sys.stderr.write(f"build-agent sandbox: cannot run {argv[0]!r}: {exc.strerror}\n")
        os._exit(127)


def main() -> None:
    try:
        opts, argv = parse(sys.argv[1:])
        if not argv:
            raise Refused("no command")
        start(opts, argv)
    except Refused as exc:
        sys.stderr.write(f"build-agent sandbox: {exc}\n")
        os._exit(FAILED)


if __name__ == "__main__":
    main()
