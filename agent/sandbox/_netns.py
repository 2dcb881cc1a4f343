"""The sandbox's named network namespace: create it (``lo`` up), remove it, run code inside it.

Created with pyroute2 as ``ip netns add`` does it: a bind mount of the namespace on
``/run/netns/<name>``, which keeps it alive without a process in it. Code that must act inside the
namespace (``lo`` up, the veth's inner end, the proxy's listening socket) runs in a fresh thread
that switches itself in with ``setns`` and then ends: the namespace is a property of the thread, so
the daemon's other threads never leave the host namespace, whatever goes wrong in there.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import IPRoute, netns

from agent.sandbox._orphans import kill_pids

log = logging.getLogger("agent.sandbox")

T = TypeVar("T")
RUN_DIR = "/run/netns"
_LIBC = ctypes.CDLL(None, use_errno=True)


def path(name: str) -> str:
    return os.path.join(RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def run_inside(name: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread switched into namespace ``name`` (None: stay in the host's);
    return its result. Blocking. pyroute2's synchronous API runs its own event loop, so it cannot
    run on the daemon's loop thread either: host-side netlink work comes here with ``None``."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            if name is not None:
                netns.setns(path(name), flags=0, libc=_LIBC)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)
        # The thread ends here, still inside the namespace: nothing to switch back.

    t = threading.Thread(target=target, name=f"netns:{name or 'host'}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def pids_inside(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (leftovers of a daemon that died)."""
    try:
        st = os.stat(path(name))
    except FileNotFoundError:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            found.append(int(entry.name))
    return found


def remove(name: str) -> None:
    """Kill any process left inside ``name`` and remove the namespace (no error if absent)."""
    if not exists(name):
        return
    killed = [p for p in pids_inside(name) if p != os.getpid()]
    left = kill_pids(killed)
    if killed:
        log.warning(
            "killed %d process(es) still in network namespace %s",
            len(killed),
            name,
        )
    if left:
        log.warning("processes %s in network namespace %s did not exit", left, name)
    with contextlib.suppress(FileNotFoundError):
        netns.remove(name, libc=_LIBC)


def create(name: str) -> None:
    """Create ``name`` (after removing a leftover of that name) and bring its ``lo`` up."""
    remove(name)
    try:
        netns.create(name, libc=_LIBC)
    except OSError as exc:
        raise _refused(exc, f"create network namespace {name}") from exc

    def lo_up() -> None:
        with IPRoute() as ipr:
            (idx,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=idx, state="up")

    try:
        run_inside(name, lo_up)
    except BaseException:
        remove(name)
        raise


class Refused(OSError):
    """The kernel or our privileges refused a namespace operation; the message has the fix."""


def _refused(exc: OSError, what: str) -> Refused:
    if exc.errno in (errno.EPERM, errno.EACCES):
        hint = (
            "the daemon needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) for the sandbox; run it as "
            'root, or set sandbox.mode = "off" (children then run unsandboxed)'
        )
    elif exc.errno == errno.EINVAL:
        hint = 'the kernel lacks network namespaces (CONFIG_NET_NS); set sandbox.mode = "off"'
    else:
        hint = f'fix the cause or set sandbox.mode = "off" ({exc})'
    return Refused(exc.errno or 0, f"cannot {what}: {os.strerror(exc.errno or 0)}; {hint}")
