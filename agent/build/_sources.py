"""A COPY/ADD source that is not in the build context, as each builder reports it, named by its
path inside the context (the builders name the daemon's staging copy or their own mount point,
which mean nothing to the caller).

Recorded with the real tools (buildah 1.28; BuildKit v0.11.6 and v0.24.0):

- buildah: ``checking on sources under "<staging dir>": copier: stat: "/sub/x": no such file or
  directory``;
- BuildKit: ``failed to compute cache key: failed to calculate checksum of ref <id>: "/sub/x": not
  found``, or (v0.11.6, when a parent directory is missing too) ``... failed to walk
  <mount>/sub: lstat <mount>/sub: no such file or directory``.
"""

from __future__ import annotations

import re

_PATTERNS = (
    re.compile(
        r'checking on sources under "[^"]*": copier: stat: "(?P<path>/[^"]*)": no such file'
    ),
    re.compile(r'failed to calculate checksum of ref \S+: "(?P<path>/[^"]*)": not found'),
    re.compile(
        r"failed to calculate checksum of ref \S+: failed to walk \S*?/buildkit-mount\d+"
        r"(?P<path>/\S*): lstat \S+: no such file or directory"
    ),
)


def missing_source(error: str) -> str | None:
    """The context-relative path of a COPY/ADD source the builder did not find, or None."""
    for pattern in _PATTERNS:
        m = pattern.search(error)
        if m:
            return m.group("path").lstrip("/") or "."
    return None


def missing_source_message(instruction: str, path: str) -> str:
    # BuildKit may name the first missing directory of a source ("sub" of "sub/x"): name the
    # instruction's source when exactly one lies below it.
    words = [w for w in instruction.split()[1:] if not w.startswith("--")]
    below = [w for w in words[:-1] if w.lstrip("./").startswith(path + "/")]
    shown = below[0] if len(below) == 1 else path
    return (
        f"{instruction} failed: {shown} is not in the build context; check the path (relative to "
        "the context directory) and that .dockerignore does not leave it out"
    )


__all__ = ["missing_source", "missing_source_message"]
