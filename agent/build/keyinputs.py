"""What a content key was made of, kept with the build record, and what differs between two.

Two parts (agent/build/records.py stores them):

- ``record.inputs``, small, in the record: the key and whether it could be trusted
  (``status``: ``known`` | ``unknown`` with ``unknown`` reasons), the Dockerfile path and digest,
  ``# syntax=``, each external image (kind, ref, digest, line, source), the build args (name ->
  HMAC of the value, so a value is never stored nor guessable from the record), target,
  platform, secret ids, process version, the context part of the key, the number of entries
  and a digest of the per-entry summary.
- ``<id>.inputs``: the per-entry summary of the context (path -> type, mode, content hash or
  link target hash), zlib-compressed. Only ``explain`` and ``diff`` read it, so ``status`` stays
  as fast for a 10,000-file context as for one file.

:func:`compare` tells what changed from one to the other; :func:`reasons` names it in the
words of the ``build_agent_base_cache_misses_total{reason}`` metric.
"""

from __future__ import annotations

import hashlib
import hmac
import zlib
from typing import Any

from agent.build.records import BuildRecord

FORMAT = 1
REASONS = ("first", "forced", "unknown", "dockerfile", "from_moved", "args", "context", "other")


def arg_digest(secret: bytes, name: str, value: str) -> str:
    """Keyed by a node-local secret: equal values compare equal, a short value cannot be
    guessed from the record by hashing candidates."""
    mac = hmac.new(secret, f"{name}={value}".encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


def encode_entries(items: list[tuple[bytes, bytes, int, bytes]]) -> bytes:
    """``(kind, path, mode, data)`` per entry -> compressed NUL-separated records (paths may
    hold any byte but NUL)."""
    out = bytearray()
    for kind, path, mode, data in items:
        if kind == b"l":
            data = hashlib.sha256(data).hexdigest()[:32].encode()
        out += b"%s\0%s\0%o\0%s\0" % (kind, path, mode, data)
    return zlib.compress(bytes(out), 6)


def entries_digest(items: list[tuple[bytes, bytes, int, bytes]]) -> str:
    h = hashlib.sha256()
    for kind, path, mode, data in items:
        h.update(b"%s\0%s\0%o\0%s\0" % (kind, path, mode, data))
    return h.hexdigest()


def decode_entries(blob: bytes) -> dict[str, str]:
    """path -> "<kind> <mode> <hash>" (the form explain shows and compares)."""
    fields = zlib.decompress(blob).split(b"\0")
    out: dict[str, str] = {}
    for i in range(0, len(fields) - 3, 4):
        kind, path, mode, data = fields[i : i + 4]
        out[path.decode("utf-8", "surrogateescape")] = (
            f"{kind.decode()} {mode.decode()} {data.decode()}"
        )
    return out


def compare(
    old: dict[str, Any],
    new: dict[str, Any],
    old_entries: dict[str, str] | None = None,
    new_entries: dict[str, str] | None = None,
) -> dict[str, Any]:
    """What differs from ``old`` to ``new`` (two ``record["inputs"]``). Context paths are
    listed when both entry summaries are given; else only whether the context changed."""
    changes: dict[str, Any] = {}
    if old.get("dockerfile", {}).get("digest") != new.get("dockerfile", {}).get("digest"):
        changes["dockerfile"] = True
    if old.get("syntax") != new.get("syntax"):
        changes["syntax"] = {"old": old.get("syntax"), "new": new.get("syntax")}
    old_images = {i["ref"]: i["digest"] for i in old.get("images", [])}
    new_images = {i["ref"]: i["digest"] for i in new.get("images", [])}
    moved = [
        {"ref": ref, "old": old_images[ref], "new": digest}
        for ref, digest in sorted(new_images.items())
        if ref in old_images and old_images[ref] != digest
    ]
    if moved:
        changes["images_moved"] = moved
    added = sorted(set(new_images) - set(old_images))
    removed = sorted(set(old_images) - set(new_images))
    if added:
        changes["images_added"] = [{"ref": r, "digest": new_images[r]} for r in added]
    if removed:
        changes["images_removed"] = [{"ref": r, "digest": old_images[r]} for r in removed]
    oa, na = old.get("args", {}), new.get("args", {})
    args = {
        "changed": sorted(k for k in set(oa) & set(na) if oa[k] != na[k]),
        "added": sorted(set(na) - set(oa)),
        "removed": sorted(set(oa) - set(na)),
    }
    if any(args.values()):
        changes["args"] = {k: v for k, v in args.items() if v}
    for field in ("target", "platform", "process_version", "secret_ids"):
        if old.get(field) != new.get(field):
            changes[field] = {"old": old.get(field), "new": new.get(field)}
    if old.get("entries_digest") != new.get("entries_digest"):
        files: dict[str, Any] = {"changed": True}
        if old_entries is not None and new_entries is not None:
            files = {
                "added": sorted(set(new_entries) - set(old_entries)),
                "removed": sorted(set(old_entries) - set(new_entries)),
                "changed": sorted(
                    p
                    for p in set(old_entries) & set(new_entries)
                    if old_entries[p] != new_entries[p]
                ),
            }
        changes["context"] = files
    return changes


def reasons(changes: dict[str, Any]) -> list[str]:
    out = []
    if changes.get("dockerfile") or "syntax" in changes:
        out.append("dockerfile")
    if any(k in changes for k in ("images_moved", "images_added", "images_removed")):
        out.append("from_moved")
    if any(k in changes for k in ("args", "target", "platform", "secret_ids")):
        out.append("args")
    if "context" in changes:
        out.append("context")
    if "process_version" in changes:
        out.append("other")
    return out or ["other"]


def same_lineage(a: BuildRecord, b: BuildRecord) -> bool:
    """Whether two records are builds of the same thing: the same target repository and
    Dockerfile path (what explain compares a build with)."""
    return (
        bool(target_repo(a))
        and target_repo(a) == target_repo(b)
        and ((a.request or {}).get("dockerfile") or "Dockerfile")
        == ((b.request or {}).get("dockerfile") or "Dockerfile")
    )


def target_repo(record: BuildRecord) -> str:
    req = record.request or {}
    if req.get("target_repo"):
        return str(req["target_repo"])
    ref = str(record.target_ref or req.get("target_ref") or "")
    name = ref.split("@", 1)[0]
    if name.rfind(":") > name.rfind("/"):
        name = name[: name.rfind(":")]
    return name


def previous(records: list[BuildRecord], record: BuildRecord) -> BuildRecord | None:
    """The newest build before ``record`` of the same target repository and Dockerfile path
    that succeeded and has key inputs (``records`` oldest first, as RecordStore.all)."""
    found = None
    for r in records:
        if r.id == record.id:
            break
        if r.state == "succeeded" and r.inputs and same_lineage(r, record):
            found = r
    return found


__all__ = [
    "FORMAT",
    "REASONS",
    "arg_digest",
    "compare",
    "decode_entries",
    "encode_entries",
    "entries_digest",
    "previous",
    "reasons",
    "same_lineage",
    "target_repo",
]
