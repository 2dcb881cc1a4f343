"""Where the request's Dockerfile is in the context: its path checked, then followed.

The path must be relative and must not climb out of the context
(:func:`check_dockerfile_path`, which the build handler also runs on the request).
:func:`resolve_dockerfile` then walks it component by component through the context's directory
fd, resolving relative symbolic links by hand, and refuses a link that is absolute or climbs above
the root, so the path it returns names a regular file inside the tree without any link in it.
Reading the file is the context walk's (agent/build/context.py).
"""

from __future__ import annotations

import os
import stat

from agent.build._safeopen import kind
from agent.errors import BadRequest

_MAX_LINKS = 40


def check_dockerfile_path(path: str) -> list[str]:
    """The path's components; refuses absolute paths, '..' and empty paths (the request's fault)."""
    if not path or path.startswith("/"):
        raise BadRequest(
            f"dockerfile path {path!r} must be relative to the context directory, "
            "e.g. 'Dockerfile'",
            details={"field": "dockerfile"},
        )
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise BadRequest(
            f"dockerfile path {path!r} leaves the context directory; "
            "give a path inside the context without '..'",
            details={"field": "dockerfile"},
        )
    return parts


def _escape(path: str, why: str) -> BadRequest:
    return BadRequest(
        f"dockerfile path {path!r} {why}; the Dockerfile must be a file inside the context "
        "directory",
        details={"field": "dockerfile"},
    )


def resolve_dockerfile(root_fd: int, path: str) -> str:
    """Follow ``path`` inside the tree, resolving relative links by hand; a link that is absolute
    or climbs above the context root is refused. Returns the link-free relative path."""
    todo = check_dockerfile_path(path)
    done: list[str] = []
    links = 0
    while todo:
        name = todo.pop(0)
        if name == ".":
            continue
        if name == "..":
            if not done:
                raise _escape(path, "follows a symbolic link out of the context directory")
            done.pop()
            continue
        rel = "/".join([*done, name])
        try:
            st = os.stat(rel, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise BadRequest(
                f"dockerfile {path!r} does not exist in the context directory; "
                "pass --file with a path relative to --context",
                details={"field": "dockerfile"},
            ) from None
        except NotADirectoryError:
            raise _escape(path, "goes through something that is not a directory") from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise _escape(path, "has too many levels of symbolic links")
            target = os.readlink(rel, dir_fd=root_fd)
            if target.startswith("/"):
                raise _escape(path, "follows a symbolic link out of the context directory")
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(name)
    final = "/".join(done)
    st = os.stat(final, dir_fd=root_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise _escape(path, f"is {kind(st.st_mode)}, not a regular file")
    return final


__all__ = ["check_dockerfile_path", "resolve_dockerfile"]
