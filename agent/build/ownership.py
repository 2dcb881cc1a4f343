"""Who may read and cancel a build (issue 11, attack 7; docs/security.md, "Ownership of builds").

A build belongs to the uids that submitted or joined it (its record's ``owners``). The rule:

    op                         owner   root   daemon.read_uids/read_gids   any other caller
    list                       full    full   full                         id, state, times only
    status, logs               yes     yes    yes                          forbidden
    cancel                     yes     yes    no                           forbidden
    build (joining the target) becomes an owner (it may build that target: it shares the build)

The op-level check (control/_auth.py: who may call ``status`` at all) comes first; this module
is the per-build check after it. Records written before ``owners`` existed fall back to the
submitter in ``peer.uid`` (``BuildRecord.from_json``); a joiner is added by
``BuildRecord.add_owner``.
"""

from __future__ import annotations

from agent.build.records import BuildRecord
from agent.config import Config
from agent.control.ops import Peer
from agent.errors import Forbidden


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


def is_owner(record: BuildRecord, peer: Peer) -> bool:
    return peer.uid in record.owners


def may_read(config: Config, record: BuildRecord, peer: Peer) -> bool:
    return is_owner(record, peer) or reads_every_build(config, peer)


def check_read(config: Config, record: BuildRecord, peer: Peer, what: str) -> None:
    """Raise Forbidden unless ``peer`` may read ``what`` ("log", "status") of the build."""
    if not may_read(config, record, peer):
        raise Forbidden(
            f"build {record.id} belongs to the callers that submitted or joined it; "
            f"uid {peer.uid} may read its {what} only as one of them, as root, or when an "
            "operator lists the uid or one of its groups in daemon.read_uids or daemon.read_gids",
            details={"id": record.id, "rule": "owner-or-reader"},
        )


def check_cancel(record: BuildRecord, peer: Peer) -> None:
    """Raise Forbidden unless ``peer`` is root or an owner of the build."""
    if peer.uid != 0 and not is_owner(record, peer):
        raise Forbidden(
            f"build {record.id} belongs to the callers that submitted or joined it; "
            f"uid {peer.uid} may cancel it only as one of them or as root",
            details={"id": record.id, "rule": "owner-or-root"},
        )


__all__ = [
    "check_cancel",
    "check_read",
    "is_owner",
    "may_read",
    "reads_every_build",
]
