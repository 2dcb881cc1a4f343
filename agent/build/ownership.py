"""Who may read and cancel a build (issue 11, attack 7; docs/security.md, "Ownership of builds").

A build belongs to the uids that submitted or joined it (its record's ``owners``). The rule:

    op                         owner   root   daemon.read_uids/read_gids   any other caller
    list                       full    full   full                         id, state, times only
    status, logs               yes     yes    yes                          forbidden
    cancel                     yes     yes    no                           forbidden
    build (joining the target) becomes an owner (it may build that target: it shares the build)

The op-level check (control/_auth.py: who may call ``status`` at all) comes first; this module
is the per-build check after it. Records written before ``owners`` existed fall back to the
submitter in ``peer.uid``.
"""

from __future__ import annotations

from typing import Any

from agent.config import Config
from agent.control.ops import Peer
from agent.errors import Forbidden


def owners(record: dict[str, Any]) -> list[int]:
    """The uids a build belongs to, submitter first."""
    got = record.get("owners")
    if isinstance(got, list):
        return [u for u in got if isinstance(u, int)]
    uid = (record.get("peer") or {}).get("uid")
    return [uid] if isinstance(uid, int) else []


def add_owner(record: dict[str, Any], uid: int) -> bool:
    """Make ``uid`` an owner (a caller joined); True when it was not one yet."""
    current = owners(record)
    if uid in current:
        return False
    record["owners"] = [*current, uid]
    return True


def reads_every_build(config: Config, peer: Peer) -> bool:
    """Root, and the uids/gids of ``daemon.read_uids``/``read_gids``: the operators' view."""
    if peer.uid == 0:
        return True
    d = config.daemon
    return (
        peer.uid in d.read_uids
        or peer.gid in d.read_gids
        or not peer.groups.isdisjoint(d.read_gids)
    )


def is_owner(record: dict[str, Any], peer: Peer) -> bool:
    return peer.uid in owners(record)


def may_read(config: Config, record: dict[str, Any], peer: Peer) -> bool:
    return is_owner(record, peer) or reads_every_build(config, peer)


def check_read(config: Config, record: dict[str, Any], peer: Peer, what: str) -> None:
    """Raise Forbidden unless ``peer`` may read ``what`` ("log", "status") of the build."""
    if not may_read(config, record, peer):
        raise Forbidden(
            f"build {record['id']} belongs to the callers that submitted or joined it; "
            f"uid {peer.uid} may read its {what} only as one of them, as root, or when an "
            "operator lists the uid or one of its groups in daemon.read_uids or daemon.read_gids",
            details={"id": record["id"], "rule": "owner-or-reader"},
        )


def check_cancel(record: dict[str, Any], peer: Peer) -> None:
    """Raise Forbidden unless ``peer`` is root or an owner of the build."""
    if peer.uid != 0 and not is_owner(record, peer):
        raise Forbidden(
            f"build {record['id']} belongs to the callers that submitted or joined it; "
            f"uid {peer.uid} may cancel it only as one of them or as root",
            details={"id": record["id"], "rule": "owner-or-root"},
        )


__all__ = [
    "add_owner",
    "check_cancel",
    "check_read",
    "is_owner",
    "may_read",
    "owners",
    "reads_every_build",
]
