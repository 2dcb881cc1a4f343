"""Opening context entries so that what is checked is what is read (agent/build/context.py).

Every entry is opened by name relative to its directory's fd with ``O_NOFOLLOW | O_NONBLOCK |
O_NOCTTY`` (plus ``O_DIRECTORY`` when readdir says directory), and judged by the ``fstat`` of the
fd, which the caller then reads, hashes, copies or descends into: a mount or file swapped in
between a look and an open is checked as what was opened (issue 11, attack 5). A symbolic link
comes back as an ``O_PATH`` fd of the link itself (``readlink("", dir_fd=fd)`` reads it); a FIFO,
socket or device node is a BadRequest naming it (attack 6): a FIFO is never read, so it never
blocks a thread. Readdir's type keeps a listed special file from being opened at all (opening a
device can have effects); one swapped in after readdir is opened non-blocking, without a
controlling tty, and refused on its fstat.
"""

from __future__ import annotations

import errno
import os
import stat

from agent.errors import BadRequest

# Open without following a final link, without blocking on a FIFO, without acquiring a tty.
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
)


def kind(mode: int) -> str:
    """What a file that is not a regular file, directory or link is, for a message."""
    for test, words in _KINDS:
        if test(mode):
            return words
    return f"a file of unknown type {stat.S_IFMT(mode):o}"


def _special(rel: str, mode: int) -> BadRequest:
    return BadRequest(
        f"context entry {rel!r} is {kind(mode)}; a build context holds only regular files, "
        "directories and symbolic links: remove it or add it to .dockerignore",
        details={"path": rel},
    )


def _changed(rel: str) -> BadRequest:
    return BadRequest(
        f"context entry {rel!r} changed while the context was read; "
        "stop changing the context directory while a build starts, then build again",
        details={"path": rel},
    )


def path_stat(dir_fd: int, name: str) -> tuple[int, os.stat_result]:
    """An ``O_PATH`` fd of ``name`` itself (a link is not followed, nothing is opened for I/O,
    so a FIFO or device sees no open) and its fstat."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def open_entry(
    dir_fd: int, name: str, rel: str, *, directory: bool = False, special: bool = False
) -> tuple[int, os.stat_result]:
    """Open context entry ``name`` and return the fd with its fstat: the object that is checked
    is the one that is then read. A symbolic link comes back as an ``O_PATH`` fd of the link.
    ``directory``: readdir says it is one (opened with O_DIRECTORY); ``special``: readdir says
    it is a FIFO, socket or device, so it is not opened for reading at all.
    Raises BadRequest for anything but a regular file, directory or link."""
    if not special:
        try:
            fd = os.open(name, _OPEN | (os.O_DIRECTORY if directory else 0), dir_fd=dir_fd)
        except OSError as exc:
            # ELOOP: a link (O_NOFOLLOW); ENXIO: a socket, or a device without a driver;
            # ENOTDIR: not the directory readdir said. Look at what it is without opening it.
            if exc.errno not in (errno.ELOOP, errno.ENXIO) and not (
                directory and exc.errno == errno.ENOTDIR
            ):
                raise
        else:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                return fd, st
            os.close(fd)
            raise _special(rel, st.st_mode)
    fd, st = path_stat(dir_fd, name)
    if stat.S_ISLNK(st.st_mode):
        return fd, st
    os.close(fd)
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        raise _changed(rel)  # it was something else a moment ago
    raise _special(rel, st.st_mode)


def open_beneath(root_fd: int, rel: str) -> int:
    """Open the link-free relative path ``rel`` one component at a time, following nothing: a
    directory swapped for a link after ``rel`` was resolved fails instead of being followed."""
    parts = rel.split("/")
    parent = root_fd
    try:
        for name in parts[:-1]:
            try:
                sub = os.open(name, _OPEN_DIR, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _changed(rel) from None
                raise
            if parent != root_fd:
                os.close(parent)
            parent = sub
        return os.open(parts[-1], _OPEN, dir_fd=parent)
    finally:
        if parent != root_fd:
            os.close(parent)


__all__ = ["kind", "open_beneath", "open_entry", "path_stat"]
