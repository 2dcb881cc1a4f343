"""A Dockerfile build's content key, from the hashed context to the base tag (issue 12).

``ops.build`` hashes the context (agent/build/context.py), then calls :func:`key_build`:

1. parse the Dockerfile and find what the target needs (dockerfile.py, stages.py);
2. resolve every external image through the resolver (single flight, ``build.from_max_age``)
   or, without one, the registry port; fail before anything runs when one cannot be;
3. the content key over the context key, ``# syntax=`` and the image digests (cachekey.py);
4. the key's inputs for the record and the per-entry summary (keyinputs.py), and the reasons a
   base miss would have, found by comparing with the newest earlier build of the same target
   repository and Dockerfile path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import PROCESS_VERSION
from agent.build import keyinputs
from agent.build.cachekey import Lookup, Pin, content_key, pin_text, resolve_uses
from agent.build.context import ContextDigest
from agent.build.dockerfile import parse
from agent.build.records import BuildRecord
from agent.build.stages import analyse
from agent.contracts import RegistryPort
from agent.errors import NotFound

log = logging.getLogger("agent.build")

_SECRETS: dict[str, bytes] = {}


@dataclass
class Keyed:
    key: str
    unknown: list[str]
    pins: list[Pin]
    pinned_text: str | None  # the Dockerfile the builder gets; None: as written
    inputs: dict[str, Any]  # record.inputs
    entries: bytes = field(repr=False, default=b"")  # <id>.inputs
    miss_reasons: list[str] = field(default_factory=list)


def make_lookup(resolver: Any, proxy: RegistryPort) -> Lookup:
    """The resolver's lookup when the daemon has one; else a plain HEAD through ``proxy``."""
    from agent.build.resolve import Resolver

    if isinstance(resolver, Resolver):
        res = resolver

        async def cached(ref: str, max_age: float) -> tuple[str, bool, float]:
            got = await res.lookup(ref, max_age=max_age)
            return got.digest, got.cached, got.age

        return cached

    async def direct(ref: str, max_age: float) -> tuple[str, bool, float]:
        digest = await proxy.manifest_digest(ref)
        if digest is None:
            raise NotFound(f"{ref} does not exist", details={"ref": ref})
        return digest, False, 0.0

    return direct


def node_secret(state_dir: str | Path) -> bytes:
    """The HMAC key of build-arg digests: made once per state directory, mode 0600."""
    path = Path(state_dir) / "builds" / "keyinputs.secret"  # hidden from children with builds/
    key = str(path)
    if key in _SECRETS:
        return _SECRETS[key]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        data = path.read_bytes()
    else:
        data = secrets.token_bytes(32)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    if len(data) < 16:
        raise OSError(f"{path} is too short to be the key-inputs secret; remove it")
    _SECRETS[key] = data
    return data


async def key_build(
    digest: ContextDigest,
    *,
    lookup: Lookup,
    max_age: float,
    build_args: dict[str, str],
    stage: str | None,
    platform: str | None,
    secret_ids: list[str],
    force: bool,
    arg_secret: bytes,
    records: list[BuildRecord],
    record: BuildRecord,
) -> Keyed:
    df = parse(digest.dockerfile_text)
    analysis = analyse(df, build_args=build_args, target=stage, platform=platform)
    pins = await resolve_uses(
        analysis.images, lookup, max_age=max_age, dockerfile=digest.dockerfile
    )
    key = content_key(digest.key, pins, df.syntax)
    pinned = pin_text(digest.dockerfile_text, analysis.images, pins)
    inputs: dict[str, Any] = {
        "format": keyinputs.FORMAT,
        "key": key,
        "status": "unknown" if analysis.unknown else "known",
        "unknown": analysis.unknown,
        "dockerfile": {
            "path": digest.dockerfile,
            "digest": "sha256:" + _sha256(digest.dockerfile_text.encode()),
        },
        "syntax": df.syntax,
        "images": [p.to_dict() for p in pins],
        "args": {k: keyinputs.arg_digest(arg_secret, k, v) for k, v in sorted(build_args.items())},
        "target": stage,
        "platform": platform,
        "secret_ids": sorted(secret_ids),
        "process_version": PROCESS_VERSION,
        "context_key": digest.key,
        "entries": len(digest.items),
        "entries_digest": keyinputs.entries_digest(digest.items),
    }
    prev = keyinputs.previous(records, record)
    if prev is not None:
        inputs["compared_to"] = prev.id
    if force:
        reasons = ["forced"]
    elif analysis.unknown:
        reasons = ["unknown"]
    elif prev is None:
        reasons = ["first"]
    else:
        reasons = keyinputs.reasons(keyinputs.compare(prev.inputs or {}, inputs))
    for why in analysis.unknown:
        log.info("content key of %s is unknown: %s", digest.dockerfile, why)
    return Keyed(
        key=key,
        unknown=analysis.unknown,
        pins=pins,
        pinned_text=pinned if pinned != digest.dockerfile_text else None,
        inputs=inputs,
        entries=keyinputs.encode_entries(digest.items),
        miss_reasons=reasons,
    )


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def write_pinned(root_fd: int, rel: str, text: str) -> None:
    """Replace the staged Dockerfile ``rel`` (under the staging directory ``root_fd``) with the
    pinned text; the walk never follows links, and neither does this."""
    parts = rel.split("/")
    parent = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        for name in parts[:-1]:
            sub = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
            )
            os.close(parent)
            parent = sub
        fd = os.open(
            parts[-1], os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
        )
        with contextlib.closing(os.fdopen(fd, "wb")) as f:
            f.write(text.encode())
    finally:
        os.close(parent)


__all__ = ["Keyed", "key_build", "make_lookup", "node_secret", "write_pinned"]
