"""``agentctl resolve REF``: the manifest digest of an image reference, asked through the daemon
(with the registry proxy's credentials and the daemon's TTL cache).

Prints the pinned reference (``registry/repo@sha256:...``), or with ``--json`` the whole result
``{ref, digest, pinned, cached, age}``. Exit 1 when the daemon answers with an error (``not_found``,
``bad_request``, ``upstream_unauthorized``, ...), 3 when it cannot be reached.
"""

from __future__ import annotations

import argparse

TYPE_CHECKING = False  # typing is not imported at run time: agentctl's start-up is measured
if TYPE_CHECKING:
    from ctl.cli import Context, Subcommands


def register(sub: Subcommands) -> None:
    p = sub.add_parser("resolve", help="print the digest of an image reference (REF@sha256:...)")
    p.add_argument("ref", help="image reference, e.g. registry.example.com/team/images:tag")
    p.set_defaults(run=_resolve)


def _resolve(opts: argparse.Namespace, ctx: Context) -> int:
    with ctx.connect() as client:
        result = client.call("resolve", {"ref": opts.ref})
    ctx.emit(result, lambda r: str(r["pinned"]))
    return 0
