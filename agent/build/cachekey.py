"""The base image's content key with the external images in it, and the Dockerfile the builder
gets (DESIGN section 2, issue 12).

    key = sha256("build-agent content key 2\\n"
                 "context <context key>\\n"            # agent/build/context.py: Dockerfile bytes,
                                                      # kept entries, args, stage, platform, ...
                 ["syntax <# syntax= value>\\n"]
                 "image <ref> <digest>\\n" ...)        # each external image, sorted by ref

Each image the needed stages pull (agent/build/stages.py) is resolved to a digest through the
registry proxy (its credentials; the resolver's single flight), all at once; a ref pinned by
digest is taken as written. The builder then builds exactly what was keyed: :func:`pin_text`
rewrites those FROM / ``--from=`` / ``--mount=...,from=`` words of the staged Dockerfile copy to
``<registry>/<repository>@<digest>`` (same number of lines, so error messages keep their line
numbers), so a tag that moves between the key and the pull cannot slip into the image.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent import reference
from agent.build.dockerfile import Instruction
from agent.build.stages import ImageUse, csv_fields
from agent.errors import (
    AgentError,
    BadRequest,
    BuildFailed,
    NotFound,
    UpstreamError,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)

# (normalised ref, max_age) -> (digest, answered from the cache, age of the answer in seconds)
Lookup = Callable[[str, float], Awaitable[tuple[str, bool, float]]]


@dataclass(frozen=True)
class Pin:
    """One external image of the key: as the Dockerfile names it and what it resolved to."""

    kind: str  # from | copy | mount
    ref: str  # as written, after ARG expansion
    name: str  # <registry>/<repository>, normalised
    digest: str
    line: int
    platform: str | None
    source: str  # "digest" (pinned in the file), "registry", "cache"
    age: float = 0.0

    @property
    def pinned(self) -> str:
        return f"{self.name}@{self.digest}"

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "kind": self.kind,
            "ref": self.ref,
            "digest": self.digest,
            "line": self.line,
            "source": self.source,
        }
        if self.platform:
            out["platform"] = self.platform
        return out


def _parse(use: ImageUse, dockerfile: str) -> reference.Reference:
    try:
        return reference.parse(use.ref)
    except BadRequest as exc:
        raise BadRequest(
            f"{dockerfile} line {use.line}: {use.ref!r} is not an image reference ({exc.message})",
            details={"field": "dockerfile", "line": use.line, "ref": use.ref},
        ) from None


def _failure(exc: AgentError, use: ImageUse, r: reference.Reference, dockerfile: str) -> Exception:
    where = f"{dockerfile} line {use.line}"
    what = {"from": "FROM", "copy": "COPY --from", "mount": "RUN --mount from"}[use.kind]
    details = {"ref": use.ref, "registry": r.registry, "line": use.line}
    if isinstance(exc, NotFound):
        return BuildFailed(
            f"{where}: {what} image not found: {use.ref} does not exist in {r.registry}; "
            "check the name and tag (nothing was built)",
            details=details,
        )
    if isinstance(exc, UpstreamUnauthorized):
        return UpstreamUnauthorized(
            f"{where}: {what} image {use.ref}: registry {r.registry} refused the proxy's "
            "credentials; add them to build.docker_config (nothing was built)",
            registry=r.registry,
            details=details,
        )
    if isinstance(exc, UpstreamError):
        return UpstreamUnavailable(
            f"{where}: {what} image {use.ref}: registry {r.registry} is unavailable "
            f"({exc.message}); try again later (nothing was built)",
            registry=r.registry,
            details=details,
        )
    exc.message = f"{where}: {what} image {use.ref}: {exc.message}"
    exc.args = (exc.message,)
    exc.details.update(details)
    return exc


async def resolve_uses(
    uses: list[ImageUse], lookup: Lookup, *, max_age: float, dockerfile: str
) -> list[Pin]:
    """A Pin per use, every distinct ref looked up once and all of them concurrently. The first
    failure in file order is raised (BuildFailed "image not found", UpstreamUnauthorized,
    UpstreamUnavailable, BadRequest for a malformed ref), naming the line, ref and registry."""
    parsed = [(u, _parse(u, dockerfile)) for u in uses]
    wanted = sorted({r.canonical for _, r in parsed if not r.digest})
    results = await asyncio.gather(
        *(lookup(ref, max_age) for ref in wanted), return_exceptions=True
    )
    answers = dict(zip(wanted, results, strict=True))
    pins: list[Pin] = []
    for use, r in parsed:
        if r.digest:
            pins.append(Pin(use.kind, use.ref, r.name, r.digest, use.line, use.platform, "digest"))
            continue
        got = answers[r.canonical]
        if isinstance(got, AgentError):
            raise _failure(got, use, r, dockerfile) from got
        if isinstance(got, BaseException):
            raise got
        digest, cached, age = got
        source = "cache" if cached else "registry"
        pins.append(
            Pin(use.kind, use.ref, r.name, digest, use.line, use.platform, source, round(age, 3))
        )
    return pins


def content_key(context_key: str, pins: list[Pin], syntax: str | None) -> str:
    h = hashlib.sha256()
    h.update(b"build-agent content key 2\ncontext %s\n" % context_key.encode())
    if syntax is not None:
        h.update(b"syntax %s\n" % syntax.strip().encode())
    for ref, digest in sorted({(p.ref, p.digest) for p in pins}):
        h.update(b"image %s %s\n" % (ref.encode(), digest.encode()))
    return h.hexdigest()


def _replace_mount(flag: str, pinned: str) -> str:
    head, _, value = flag.partition("=")
    parts = []
    for part in csv_fields(value):
        k, eq, _v = part.partition("=")
        parts.append(f"{k}={pinned}" if eq and k.strip().lower() == "from" else part)
    return f"{head}={','.join(parts)}"


def _rewrite(inst: Instruction, pins: list[tuple[ImageUse, Pin]]) -> str:
    text = inst.text
    if inst.keyword == "FROM":
        words = list(inst.args)
        tail = words[-2:] if len(words) >= 3 and words[-2].lower() == "as" else []
        return " ".join(["FROM", *inst.flags, pins[0][1].pinned, *tail])
    for use, pin in pins:
        pinned = pin.pinned
        new = f"--from={pinned}" if use.kind == "copy" else _replace_mount(use.raw, pinned)
        text = text.replace(use.raw, new, 1)
    return f"{inst.keyword} {text}"


def pin_text(text: str, uses: list[ImageUse], pins: list[Pin]) -> str:
    """``text`` with each use (not already pinned by digest) rewritten to its Pin; the other
    lines, heredoc bodies included, are kept byte for byte."""
    by_inst: dict[int, list[tuple[ImageUse, Pin]]] = {}
    insts: dict[int, Instruction] = {}
    for use, pin in zip(uses, pins, strict=True):
        if pin.source == "digest":
            continue
        by_inst.setdefault(use.instruction.line, []).append((use, pin))
        insts[use.instruction.line] = use.instruction
    if not by_inst:
        return text
    lines = text.splitlines(keepends=True)
    for first, inst in insts.items():
        new = _rewrite(inst, by_inst[first])
        span = range(inst.line - 1, inst.cmd_end)
        for n in span:
            ending = "\n" if lines[n].endswith("\n") else ""
            lines[n] = (new if n == span[0] else "") + ending
    return "".join(lines)


__all__ = ["Lookup", "Pin", "content_key", "pin_text", "resolve_uses"]
