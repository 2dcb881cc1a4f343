"""``.dockerignore`` parsing and matching, with Docker's rules (moby's ``patternmatcher``).

Parsing (moby ``dockerignore.ReadAll``): a UTF-8 BOM on the first line is dropped; a line starting
with ``#`` is a comment; lines are trimmed and empty ones skipped; a leading ``!`` makes an
exception (the rest is trimmed again); the pattern is cleaned like Go's ``filepath.Clean`` and a
leading ``/`` is dropped.

Matching (``MatchesOrParentMatches``): every pattern is tried in order and the last one that
matches decides (an exception re-includes). A pattern matches a path when it matches the path
itself or any of its parent directories. ``*`` and ``?`` never match ``/``; ``**`` matches any
number of directories, including none; ``[...]`` is a character class (``[!...]``/``[^...]``
negated); ``\\`` escapes the next character.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

_BOM = "\ufeff"
_SPECIAL = set(".+()|{}$^")


@dataclass(frozen=True)
class _Pattern:
    text: str
    exception: bool
    regex: re.Pattern[str]


def _clean(path: str) -> str:
    """Go's filepath.Clean for slash paths (posixpath.normpath keeps a leading '//')."""
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def _compile(pattern: str) -> re.Pattern[str]:
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1  # "**/" is treated as "**"
                # "**" at the end takes everything; elsewhere any number of directories.
                out.append(".*" if i >= n else "(.*/)?")
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\":
            if i + 1 < n:
                i += 1
                out.append(re.escape(pattern[i]))
            else:
                out.append(re.escape("\\"))
        elif ch == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                out.append(re.escape("["))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        elif ch in _SPECIAL:
            out.append("\\" + ch)
        else:
            out.append(ch)
        i += 1
    out.append("$")
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error:
        # Docker refuses such a file ("syntax error in pattern"); matching nothing is the
        # closest harmless reading, and the Dockerfile build reports the real problem.
        return re.compile(r"(?!)")


def parse(text: str) -> list[_Pattern]:
    """The patterns of a .dockerignore file, in order."""
    patterns: list[_Pattern] = []
    for lineno, raw in enumerate(text.splitlines()):
        line = raw[1:] if lineno == 0 and raw.startswith(_BOM) else raw
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        if line:
            line = _clean(line)
            if len(line) > 1 and line.startswith("/"):
                line = line[1:]
        patterns.append(_Pattern(line, exception, _compile(line)))
    return patterns


class Matcher:
    """Decides which context paths (slash-separated, relative, no leading './') are excluded."""

    def __init__(self, patterns: list[_Pattern]) -> None:
        self._patterns = patterns
        self.has_exceptions = any(p.exception for p in patterns)

    @classmethod
    def from_text(cls, text: str) -> Matcher:
        return cls(parse(text))

    def excluded(self, path: str) -> bool:
        if not self._patterns:
            return False
        parents = path.split("/")[:-1]
        matched = False
        for p in self._patterns:
            hit = p.regex.match(path) is not None
            if not hit and parents:
                for i in range(1, len(parents) + 1):
                    if p.regex.match("/".join(parents[:i])) is not None:
                        hit = True
                        break
            if hit:
                matched = not p.exception
        return matched


__all__ = ["Matcher", "parse"]
