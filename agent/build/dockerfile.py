"""A Dockerfile reader for the content key: instructions, not their meaning.

It follows the Dockerfile reference (docs.docker.com/reference/dockerfile) as BuildKit's
frontend reads it:

- **Parser directives** (``# syntax=``, ``# escape=``, ``# check=``) only at the very top, before
  any blank line, comment or instruction; keys are case-insensitive; an unknown one is a
  comment and ends the directives. ``escape`` is ``\\`` (default) or a backtick.
- **Comments**: a line whose first non-blank character is ``#``. Inside a continued instruction
  comment lines and empty lines are dropped, as BuildKit does.
- **Continuations**: a line ending in the escape character (trailing blanks allowed) continues
  on the next line; the escape and the line break are removed.
- **Heredocs** (``RUN``, ``COPY``, ``ADD``): each ``<<WORD``, ``<<-WORD``, ``<<"WORD"`` or
  ``<<'WORD'`` word of the command is followed by a body, ended by a line that is ``WORD``
  (``<<-``: after leading tabs). Bodies are skipped, never read as instructions.

What it cannot read is reported in :attr:`Dockerfile.problems` (an unterminated heredoc, a
continuation that ends the file): the key then cannot trust its reading (agent/build/stages.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9_-]*)\s*=\s*(.*?)\s*$")
_KNOWN_DIRECTIVES = frozenset({"syntax", "escape", "check"})
_HEREDOC = re.compile(r"^<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_.-]*)\2")
_HEREDOC_COMMANDS = frozenset({"RUN", "COPY", "ADD"})


@dataclass(frozen=True)
class Instruction:
    """One instruction: ``keyword`` upper-cased, ``flags`` the leading ``--name[=value]`` words,
    ``args`` the remaining words (quotes kept, as written), ``text`` everything after the
    keyword with continuations joined. ``line``..``cmd_end`` are the 1-based lines of the
    command, ``end`` the last line including heredoc bodies."""

    keyword: str
    text: str
    flags: tuple[str, ...]
    args: tuple[str, ...]
    line: int
    cmd_end: int
    end: int
    heredocs: tuple[str, ...] = ()

    def flag(self, name: str) -> str | None:
        """The value of the last ``--name=value`` flag (``""`` for a bare ``--name``)."""
        found: str | None = None
        for f in self.flags:
            key, eq, value = f[2:].partition("=")
            if key.lower() == name:
                found = value if eq else ""
        return found

    def all_flags(self, name: str) -> list[str]:
        out = []
        for f in self.flags:
            key, eq, value = f[2:].partition("=")
            if key.lower() == name:
                out.append(value if eq else "")
        return out


@dataclass(frozen=True)
class Dockerfile:
    directives: dict[str, str]
    escape: str
    instructions: tuple[Instruction, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def syntax(self) -> str | None:
        return self.directives.get("syntax")


def split_words(text: str, escape: str = "\\") -> list[str]:
    """Whitespace-separated words; quotes (single, double) and the escape character keep
    blanks inside a word. Quotes and escapes stay in the words (the expander reads them)."""
    words: list[str] = []
    cur: list[str] = []
    quote = ""
    i = 0
    in_word = False
    while i < len(text):
        c = text[i]
        if quote:
            cur.append(c)
            if c == escape and quote == '"' and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c == escape and i + 1 < len(text):
            cur += [c, text[i + 1]]
            in_word = True
            i += 1
        elif c in "\"'":
            quote = c
            cur.append(c)
            in_word = True
        elif c.isspace():
            if in_word:
                words.append("".join(cur))
                cur = []
                in_word = False
        else:
            cur.append(c)
            in_word = True
        i += 1
    if in_word:
        words.append("".join(cur))
    return words


def _directives(lines: list[str]) -> tuple[dict[str, str], int]:
    found: dict[str, str] = {}
    n = 0
    for line in lines:
        m = _DIRECTIVE.match(line.strip()) if line.strip().startswith("#") else None
        if m is None:
            break
        key = m.group(1).lower()
        if key not in _KNOWN_DIRECTIVES or key in found:
            break  # an unknown or repeated directive is a comment, and ends the directives
        found[key] = m.group(2)
        n += 1
    return found, n


def _ends_with_escape(line: str, escape: str) -> bool:
    stripped = line.rstrip(" \t")
    if not stripped.endswith(escape):
        return False
    # An even run of escapes ends in an escaped escape, not a continuation.
    run = len(stripped) - len(stripped.rstrip(escape))
    return run % 2 == 1


def parse(text: str) -> Dockerfile:
    """Read ``text`` (a whole Dockerfile). Never raises: trouble goes to ``problems``."""
    lines = text.splitlines()
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    directives, i = _directives(lines)
    escape = directives.get("escape", "\\")
    problems: list[str] = []
    if escape not in ("\\", "`"):
        problems.append(f"escape directive {escape!r} is neither \\ nor `")
        escape = "\\"
    out: list[Instruction] = []
    while i < len(lines):
        raw = lines[i]
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        start = i
        parts: list[str] = []
        line = raw
        while _ends_with_escape(line, escape):
            parts.append(line.rstrip(" \t")[:-1])
            i += 1
            # Comment and empty lines inside a continuation are dropped.
            while i < len(lines) and (not lines[i].strip() or lines[i].strip().startswith("#")):
                i += 1
            if i >= len(lines):
                i = len(lines) - 1
                line = ""
                break
            line = lines[i]
        else:
            parts.append(line)
        cmd_end = i
        joined = "".join(parts).strip()
        keyword, _, rest = joined.partition(" ")
        if "\t" in keyword:
            keyword, _, more = keyword.partition("\t")
            rest = more + " " + rest
        rest = rest.strip()
        kw = keyword.upper()
        words = split_words(rest, escape)
        flags: list[str] = []
        while words and words[0].startswith("--") and len(words[0]) > 2:
            flags.append(words.pop(0))
        bodies: list[str] = []
        i = cmd_end + 1
        onbuild = kw == "ONBUILD" and bool(words) and words[0].upper() in _HEREDOC_COMMANDS
        if kw in _HEREDOC_COMMANDS or onbuild:
            for word in words:
                m = _HEREDOC.match(word)
                if m is None:
                    continue
                strip_tabs, name = m.group(1) == "-", m.group(3)
                bodies.append(name)
                while i < len(lines):
                    body = lines[i].lstrip("\t") if strip_tabs else lines[i]
                    i += 1
                    if body == name:
                        break
                else:
                    problems.append(
                        f"line {start + 1}: heredoc <<{name} is not terminated before the end "
                        "of the file"
                    )
        out.append(
            Instruction(
                keyword=kw,
                text=rest,
                flags=tuple(flags),
                args=tuple(words),
                line=start + 1,
                cmd_end=cmd_end + 1,
                end=i,
                heredocs=tuple(bodies),
            )
        )
    return Dockerfile(directives, escape, tuple(out), tuple(problems))


__all__ = ["Dockerfile", "Instruction", "parse", "split_words"]
