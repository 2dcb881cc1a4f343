"""Who is on the other end of a control connection, and what they may do (DESIGN section 5).

The kernel's SO_PEERCRED gives pid, uid and gid; supplementary groups come from
``/proc/<pid>/status`` (only read when a gid list could make the difference). Root may run every
op; admin ops are root's alone; ``daemon.allowed_uids/gids`` may build and read;
``daemon.read_uids/gids`` may only read. Which builds a reader may read is the per-build rule of
``agent.build.ownership`` (owners, root and ``daemon.read_uids/gids``).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from agent.control.ops import Access, Op, Peer
from agent.runtime import App

UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket, need_groups: Callable[[int], bool]) -> Peer:
    """SO_PEERCRED of a connected Unix socket, plus supplementary groups when
    ``need_groups(uid)`` says they could make the difference."""
    pid, uid, gid = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    groups: frozenset[int] = frozenset()
    if pid > 0 and need_groups(uid):
        groups = _supplementary_groups(pid)
    return Peer(pid=pid, uid=uid, gid=gid, groups=groups)


def _supplementary_groups(pid: int) -> frozenset[int]:
    # The kernel has no socket option for them; /proc is what polkit and dbus read as well.
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


class Authorizer:
    def __init__(self, app: App) -> None:
        d = app.config.daemon
        self.build_uids = frozenset(d.allowed_uids)
        self.build_gids = frozenset(d.allowed_gids)
        self.read_uids = self.build_uids | frozenset(d.read_uids)
        self.read_gids = self.build_gids | frozenset(d.read_gids)
        self._config_read_uids = frozenset(d.read_uids)
        self._config_read_gids = frozenset(d.read_gids)
        self.socket_group = d.socket_group

    def needs_groups(self, uid: int) -> bool:
        if uid == 0:
            return False
        # The op check, and reading every build's log (agent.build.ownership): a builder in
        # allowed_uids may still read every build through a group of daemon.read_gids.
        every = bool(self._config_read_gids) and uid not in self._config_read_uids
        return every or (uid not in self.read_uids and bool(self.read_gids))

    def allowed(self, access: Access, peer: Peer) -> bool:
        if peer.uid == 0:
            return True
        if access is Access.ADMIN:
            return False
        uids, gids = (
            (self.build_uids, self.build_gids)
            if access is Access.BUILD
            else (self.read_uids, self.read_gids)
        )
        if peer.uid in uids or peer.gid in gids:
            return True
        return not gids.isdisjoint(peer.groups)

    def refusal(self, op: Op, peer: Peer) -> str:
        if op.access is Access.ADMIN:
            return f"op {op.name!r} is for root only (you are uid {peer.uid})"
        keys = (
            "daemon.allowed_uids or daemon.allowed_gids"
            if op.access is Access.BUILD
            else "daemon.allowed_uids/allowed_gids or daemon.read_uids/read_gids"
        )
        return (
            f"uid {peer.uid} (gid {peer.gid}) may not run {op.name!r}; an operator can allow it "
            f"by adding the uid or one of its groups to {keys} in the daemon's config"
        )
