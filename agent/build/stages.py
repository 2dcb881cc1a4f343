"""Which external images a build uses: stages, ARG expansion, and what the key cannot know.

From a parsed Dockerfile (agent/build/dockerfile.py), the build args, the target stage and the
platform, :func:`analyse` finds the stages the target needs and, in them, every image that is
pulled from a registry: ``FROM <image>``, ``COPY --from=<image>`` and
``RUN --mount=...,from=<image>``. ``scratch`` and names (or indices) of earlier stages are not
images. As BuildKit does:

- ``ARG`` lines before the first ``FROM`` are the global scope, visible in ``FROM`` lines (with
  the automatic ``TARGETPLATFORM``, ``BUILDPLATFORM``, ... ``TARGETARCH`` etc.); a build arg
  overrides a default. Inside a stage an ``ARG`` (or ``ENV``) declares what ``--from=`` and
  ``--mount`` may expand; a bare ``ARG X`` takes the build arg or the global default.
- ``$X``, ``${X}``, ``${X:-word}``, ``${X-word}``, ``${X:+word}``, ``${X+word}``; single quotes
  keep text literal; the escape character escapes ``$``.

Whatever cannot be evaluated exactly goes to :attr:`Analysis.unknown` with the reason: the key
is then "unknown" and the build rebuilds (never a stale hit). That covers other ``${...}``
forms, a variable no line declares (it may come from a base image's ENV), a ``# syntax=``
frontend other than docker/dockerfile (it may read the file differently), ``ADD`` of a URL or a
git repository without ``--checksum`` (content the key does not see), and parse problems.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from agent.build.dockerfile import Dockerfile, Instruction, split_words
from agent.errors import BadRequest

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOCKERFILE_FRONTEND = re.compile(
    r"^(docker\.io/)?docker/dockerfile(-upstream)?(:[A-Za-z0-9._-]+)?(@sha256:[0-9a-f]{64})?$"
)
_REMOTE = re.compile(r"^(https?://|git@|git://|ssh://)", re.IGNORECASE)
_ARCHES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


class Unknown(Exception):
    """A construct the key cannot evaluate (the reason is the message)."""


@dataclass(frozen=True)
class ImageUse:
    """An external image the build pulls. ``raw`` is the text as written (before expansion):
    the FROM image word, the ``--from=`` flag, or the whole ``--mount=`` flag."""

    kind: str  # "from" | "copy" | "mount"
    ref: str  # after expansion
    line: int
    stage: int
    platform: str | None
    raw: str
    instruction: Instruction = field(compare=False, repr=False)


@dataclass
class Stage:
    index: int
    name: str | None
    line: int
    deps: set[int] = field(default_factory=set)
    uses: list[ImageUse] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # ENV set in the stage (inherited)


@dataclass
class Analysis:
    stages: list[Stage]
    target: int | None  # index of the target stage
    needed: list[int]  # stages the target needs, in file order
    images: list[ImageUse]  # external images of the needed stages, in file order
    unknown: list[str]  # why the key cannot be trusted; empty: it can
    syntax: str | None


def node_platform() -> str:
    machine = os.uname().machine
    return f"linux/{_ARCHES.get(machine, machine)}"


def _platform_args(prefix: str, platform: str) -> dict[str, str]:
    parts = platform.split("/")
    os_, arch = [*parts, "", ""][:2]
    variant = parts[2] if len(parts) > 2 else ""
    return {
        f"{prefix}PLATFORM": platform,
        f"{prefix}OS": os_,
        f"{prefix}ARCH": arch,
        f"{prefix}VARIANT": variant,
    }


def expand(word: str, env: dict[str, str], escape: str = "\\", *, strict: bool = True) -> str:
    """``word`` with quotes removed and variables expanded from ``env``. A variable missing from
    ``env`` raises Unknown when ``strict`` (it could come from somewhere the key cannot see)."""
    out: list[str] = []
    i = 0
    quote = ""
    while i < len(word):
        c = word[i]
        if c == escape and quote != "'" and i + 1 < len(word):
            out.append(word[i + 1])
            i += 2
        elif c in "\"'" and (not quote or quote == c):
            quote = "" if quote else c
            i += 1
        elif c == "$" and quote != "'":
            i, value = _variable(word, i + 1, env, escape, strict)
            out.append(value)
        else:
            out.append(c)
            i += 1
    if quote:
        raise Unknown(f"unterminated quote in {word!r}")
    return "".join(out)


def _lookup(name: str, env: dict[str, str], strict: bool) -> str | None:
    if name in env:
        return env[name]
    if strict:
        raise Unknown(f"variable {name} is not declared by an ARG or ENV the key can see")
    return None


def _variable(word: str, i: int, env: dict[str, str], escape: str, strict: bool) -> tuple[int, str]:
    if i < len(word) and word[i] == "{":
        close = word.find("}", i)
        if close < 0:
            raise Unknown(f"unterminated ${{ in {word!r}")
        inner = word[i + 1 : close]
        if "${" in inner or "$(" in inner:
            raise Unknown(f"nested expansion in {word!r}")
        m = _NAME.match(inner)
        if m is None:
            raise Unknown(f"cannot expand ${{{inner}}}")
        name, rest = m.group(0), inner[m.end() :]
        if not rest:
            return close + 1, _lookup(name, env, strict) or ""
        for op in (":-", ":+", "-", "+"):
            if rest.startswith(op):
                alt = expand(rest[len(op) :], env, escape, strict=strict)
                value = _lookup(name, env, strict)
                if op == ":-":
                    return close + 1, value if value else alt
                if op == "-":
                    return close + 1, alt if value is None else value
                if op == ":+":
                    return close + 1, alt if value else ""
                return close + 1, "" if value is None else alt
        raise Unknown(f"the expansion ${{{inner}}} is not evaluated by the key")
    m = _NAME.match(word, i)
    if m is None:
        return i, "$"
    return m.end(), _lookup(m.group(0), env, strict) or ""


def _arg_pairs(inst: Instruction) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for word in inst.args:
        name, eq, value = word.partition("=")
        out.append((name, value if eq else None))
    return out


def _env_pairs(inst: Instruction) -> list[tuple[str, str]]:
    words = list(inst.args)
    if words and "=" not in words[0]:
        # ENV key value (the old form): the value is the rest of the line
        return [(words[0], inst.text.split(None, 1)[1] if len(words) > 1 else "")]
    return [(w.partition("=")[0], w.partition("=")[2]) for w in words]


def _mount_from(flag: str) -> str | None:
    """The ``from=`` of a ``--mount=`` value (CSV of key=value)."""
    value = flag.partition("=")[2]
    for part in csv_fields(value):
        k, eq, v = part.partition("=")
        if eq and k.strip().lower() == "from":
            return v
    return None


def csv_fields(text: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    quote = False
    for c in text:
        if c == '"':
            quote = not quote
            cur.append(c)
        elif c == "," and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def analyse(
    df: Dockerfile,
    *,
    build_args: dict[str, str] | None = None,
    target: str | None = None,
    platform: str | None = None,
) -> Analysis:
    """See the module docstring. Raises BadRequest only for a ``target`` stage the file does
    not have (when the file was read without problems)."""
    reader = _Reader(df.escape, dict(build_args or {}), platform or node_platform())
    reader.unknown.extend(df.problems)
    syntax = df.syntax
    if syntax is not None and not _DOCKERFILE_FRONTEND.match(syntax.strip()):
        reader.unknown.append(
            f"# syntax={syntax} names a frontend other than docker/dockerfile, which may read "
            "the Dockerfile differently"
        )
    for inst in df.instructions:
        reader.read(inst)
    stages, unknown = reader.stages, reader.unknown
    target_index = _target_index(stages, reader.by_name, target, unknown)
    if not stages:
        unknown.append("the Dockerfile has no FROM line")
    order = _needed(stages, target_index)
    images = [u for n in order for u in stages[n].uses]
    return Analysis(stages, target_index, order, images, unknown, syntax)


class _Reader:
    """One walk over a Dockerfile's instructions: the ARG scopes, the stages with their
    dependencies and images, and what the key cannot evaluate (``unknown``)."""

    def __init__(self, escape: str, build_args: dict[str, str], target_platform: str) -> None:
        self.esc = escape
        self.args = build_args
        self.unknown: list[str] = []
        self.globals: dict[str, str] = {
            **_platform_args("TARGET", target_platform),
            **_platform_args("BUILD", node_platform()),
        }
        self.declared_globals: dict[str, str] = {}
        self.stages: list[Stage] = []
        self.by_name: dict[str, int] = {}
        self.cur: Stage | None = None
        self.scope: dict[str, str] = {}  # the ARGs declared in the current stage

    def read(self, inst: Instruction) -> None:
        if inst.keyword == "ARG":
            for name, default in _arg_pairs(inst):
                try:
                    self._declare(name, default)
                except Unknown as exc:
                    self._note(inst, str(exc))
        elif inst.keyword == "FROM":
            self._from(inst)
        elif self.cur is not None:  # before the first FROM only ARG is allowed; the builder says so
            self._in_stage(inst, self.cur)

    def _note(self, inst: Instruction, why: str) -> None:
        self.unknown.append(f"line {inst.line}: {why}")

    def _stage_ref(self, text: str, *, numeric: bool) -> int | None:
        key = text.lower()
        if key in self.by_name:
            return self.by_name[key]
        if numeric and text.isdigit() and int(text) < len(self.stages) - 1:
            return int(text)
        return None

    def _declare(self, name: str, default: str | None) -> None:
        value = self.args.get(name)
        if self.cur is None:
            if value is None:
                value = (
                    expand(default, self.globals, self.esc, strict=False)
                    if default is not None
                    else ""
                )
            self.globals[name] = value
            self.declared_globals[name] = value
            return
        if value is None:
            if default is not None:
                value = expand(default, self.scope, self.esc, strict=False)
            else:
                value = self.declared_globals.get(name, self.globals.get(name, ""))
        self.scope[name] = value

    def _from(self, inst: Instruction) -> None:
        words = list(inst.args)
        alias: str | None = None
        if len(words) >= 3 and words[-2].lower() == "as":
            alias = words[-1].lower()
            words = words[:-2]
        cur = Stage(len(self.stages), alias, inst.line)
        self.stages.append(cur)
        self.cur = cur
        self.scope = {}
        self._base(inst, words, cur)
        if alias:  # after the base lookup: a stage is never its own base
            self.by_name[alias] = cur.index

    def _base(self, inst: Instruction, words: list[str], cur: Stage) -> None:
        if len(words) != 1:
            self._note(inst, "FROM is not 'FROM [--platform=...] image [AS name]'")
            return
        try:
            # In FROM lines an undeclared variable is empty (only ARGs reach them).
            image = expand(words[0], self.globals, self.esc, strict=False)
            fplat = inst.flag("platform")
            fplat = expand(fplat, self.globals, self.esc, strict=False) if fplat else None
        except Unknown as exc:
            self._note(inst, str(exc))
            return
        base = self._stage_ref(image, numeric=False)
        if base is not None and base < cur.index:
            cur.deps.add(base)
            cur.env = dict(self.stages[base].env)
        elif image.lower() != "scratch":
            cur.uses.append(ImageUse("from", image, inst.line, cur.index, fplat, words[0], inst))
            cur.env = {}

    def _in_stage(self, inst: Instruction, cur: Stage) -> None:
        kw = inst.keyword
        if kw == "ENV":
            for k, v in _env_pairs(inst):
                try:
                    cur.env[k] = expand(v, {**cur.env, **self.scope}, self.esc)
                except Unknown:
                    cur.env.pop(k, None)  # depends on what the key cannot see: unknowable
            return
        env = {**cur.env, **self.scope}
        if kw == "COPY":
            raw = inst.flag("from")
            if raw:
                flag = next(f for f in reversed(inst.flags) if f.lower().startswith("--from="))
                self._source("copy", raw, flag, inst, cur, env)
        elif kw == "RUN":
            for flag in inst.flags:
                raw_from = _mount_from(flag) if flag.lower().startswith("--mount=") else None
                if raw_from:
                    self._source("mount", raw_from, flag, inst, cur, env)
        elif kw == "ADD" and inst.flag("checksum") is None:
            sources = [w for w in inst.args[:-1] if not w.startswith("<<")]
            if any(_REMOTE.match(w.strip("\"'")) for w in sources):
                self._note(
                    inst,
                    "ADD of a URL or git repository without --checksum: the key does not "
                    "see that content",
                )

    def _source(
        self, kind: str, raw: str, word: str, inst: Instruction, cur: Stage, env: dict[str, str]
    ) -> None:
        """An image a COPY --from or RUN --mount from= names: a stage of this file, scratch, or
        an external image the key must resolve."""
        try:
            src = expand(raw, env, self.esc)
        except Unknown as exc:
            label = f"COPY --from={raw}" if kind == "copy" else f"RUN --mount from={raw}"
            self._note(inst, f"{label}: {exc}")
            return
        dep = self._stage_ref(src, numeric=True)
        if dep is not None:
            cur.deps.add(dep)
        elif src.lower() != "scratch":
            cur.uses.append(ImageUse(kind, src, inst.line, cur.index, None, word, inst))


def _target_index(
    stages: list[Stage], by_name: dict[str, int], target: str | None, unknown: list[str]
) -> int | None:
    """The target stage: the named one, else the last. A name the file lacks is a BadRequest
    when the file was read without problems, else one more reason the key is unknown."""
    if not target:
        return len(stages) - 1 if stages else None
    index = by_name.get(target.lower())
    if index is None:
        if not unknown:
            names = ", ".join(s.name for s in stages if s.name) or "none"
            raise BadRequest(
                f"target stage {target!r} is not in the Dockerfile (named stages: {names})",
                details={"field": "target"},
            )
        unknown.append(f"target stage {target!r} was not found")
    return index


def _needed(stages: list[Stage], target: int | None) -> list[int]:
    """The stages ``target`` depends on (itself included), in file order."""
    needed: set[int] = set()
    todo = [target] if target is not None else []
    while todo:
        n = todo.pop()
        if n in needed:
            continue
        needed.add(n)
        todo.extend(stages[n].deps)
    return sorted(needed)


__all__ = [
    "Analysis",
    "ImageUse",
    "Stage",
    "Unknown",
    "analyse",
    "expand",
    "node_platform",
    "split_words",
]
