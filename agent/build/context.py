"""The build context, read through the directory fd the caller passed (never through a path).

Everything here works relative to that fd with ``dir_fd`` and ``O_NOFOLLOW``: a symlink in the
context is hashed as a link (its target text), never followed, so nothing outside the tree is read.

Open first, then check (issue 11, attacks 5 and 6): every entry is opened by name with
``O_NOFOLLOW | O_NONBLOCK`` (``O_DIRECTORY`` for directories) and the type, owner and mode that
decide are the ``fstat`` of that fd, which is then the one read, hashed, copied or descended into.
A directory swapped for a bind mount between the look and the open is therefore checked as the
mount it now is. Only regular files, directories and symbolic links are accepted: a FIFO, a socket
or a device node is a ``bad_request`` naming its path (entries ``.dockerignore`` leaves out are not
opened at all). Readdir's file type keeps special files from being opened; one swapped in after
readdir is opened non-blocking and without a controlling tty, then refused on its fstat. The
Dockerfile and ``.dockerignore`` are opened component by component without following anything,
and read up to a limit that the error names.

Whose permissions apply: the daemon runs as root, but a caller must build only what it can read.
The fd itself proves the caller could open the directory; for everything below it,
:func:`hash_context` checks the caller's uid/gid/groups against each entry's owner and mode bits
(read on files, read+search on directories) and refuses the build naming the first entry the
caller could not read. POSIX ACLs and capabilities are not evaluated (the check is stricter than
the kernel when an ACL grants more, never looser). Doing the whole walk in a child with the caller's
uid would be exact but costs a process per build; the mode check is the documented trade-off.

The context key is sha256 over: the process version, the Dockerfile's bytes, every entry
``.dockerignore`` keeps (type, path, mode, content hash or link target), the build args, the stage
and the platform. The content key (DESIGN section 2) adds the digests of the external images
the Dockerfile uses (agent/build/cachekey.py). File content hashes are cached by
(dev, inode, size, mtime_ns, ctime_ns), so a warm tree costs one stat per entry.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from agent import PROCESS_VERSION
from agent.build._safeopen import kind, open_beneath, open_entry, path_stat
from agent.build.dockerfile_path import resolve_dockerfile
from agent.build.dockerignore import Matcher
from agent.errors import BadRequest, Forbidden

_CHUNK = 1 << 20
_MAX_DOCKERFILE = 4 << 20
_MAX_DOCKERIGNORE = 4 << 20


@dataclass(frozen=True)
class Caller:
    """Whose read permission the context walk enforces (from SO_PEERCRED)."""

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    def may(self, st: os.stat_result, want: int) -> bool:
        """``want`` is a mask of 4 (read), 1 (search/execute), as the kernel checks it."""
        if self.uid == 0:
            return True  # read and directory search are never refused to root
        if st.st_uid == self.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid == self.gid or st.st_gid in self.groups:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & want == want


ROOT = Caller(0, 0)


class HashCache:
    """File content hashes by (dev, ino, size, mtime_ns, ctime_ns); bounded, LRU, thread-safe."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._max = max_entries
        self._data: OrderedDict[tuple[int, int, int, int, int], str] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(st: os.stat_result) -> tuple[int, int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def get(self, st: os.stat_result) -> str | None:
        k = self.key(st)
        with self._lock:
            value = self._data.get(k)
            if value is not None:
                self._data.move_to_end(k)
                self.hits += 1
            else:
                self.misses += 1
            return value

    def put(self, st: os.stat_result, digest: str) -> None:
        with self._lock:
            self._data[self.key(st)] = digest
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_Item = tuple[bytes, bytes, int, bytes]


@dataclass
class ContextDigest:
    key: str  # hex sha256: the context key (the content key adds the images: cachekey.py)
    dockerfile: str  # the Dockerfile's path inside the context after resolving links
    dockerfile_text: str = ""
    files: int = 0
    bytes: int = 0
    excluded: int = 0
    entries: list[str] = field(default_factory=list)  # only filled when asked (tests, debug)
    # (kind, path, mode, hash or link target) of every kept entry: the per-file summary the
    # record keeps for explain (agent/build/keyinputs.py)
    items: list[_Item] = field(default_factory=list)


def _read_small(root_fd: int, rel: str, caller: Caller, limit: int, what: str) -> bytes:
    """The bytes of ``rel`` (the Dockerfile, .dockerignore), checked on the opened fd: a regular
    file the caller may read, at most ``limit`` bytes (counted while reading: it may grow)."""
    try:
        fd = open_beneath(root_fd, rel)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):
            raise
        pfd, pst = path_stat(root_fd, rel)
        os.close(pfd)
        raise BadRequest(
            f"{what} {rel!r} is {kind(pst.st_mode)}; it must be a regular file in the context",
            details={"path": rel},
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(
                f"{what} {rel!r} is {kind(st.st_mode)}; it must be a regular file in the context",
                details={"path": rel},
            )
        if not caller.may(st, 4):
            raise Forbidden(
                f"context file {rel!r} is not readable by uid {caller.uid}; "
                "make it readable or leave it out of the context",
                details={"path": rel},
            )
        too_big = BadRequest(
            f"{what} {rel!r} is larger than the limit of {limit >> 20} MiB ({limit} bytes); "
            "make it smaller",
            details={"path": rel, "limit": limit},
        )
        if st.st_size > limit:
            raise too_big
        chunks: list[bytes] = []
        got = 0
        while True:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - got))
            if not chunk:
                return b"".join(chunks)
            got += len(chunk)
            if got > limit:
                raise too_big
            chunks.append(chunk)
    finally:
        os.close(fd)


def _hash_file(
    fd: int,
    name: str,
    st: os.stat_result,
    cache: HashCache | None,
    copy_to: int | None = None,
) -> str:
    """sha256 of the open regular file ``fd`` (``st`` is its fstat; from the cache when it knows
    it); with ``copy_to``, also copy it into that directory as ``name`` (with mode and times):
    the hash is of the bytes copied."""
    if cache is not None and copy_to is None:
        hit = cache.get(st)
        if hit is not None:
            return hit
    dst = -1
    try:
        if copy_to is not None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            dst = os.open(name, flags, 0o600, dir_fd=copy_to)
        h = hashlib.sha256()
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            h.update(chunk)
            if dst >= 0:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view) :]
        fst = os.fstat(fd)
        if dst >= 0:
            os.fchmod(dst, stat.S_IMODE(st.st_mode))
    finally:
        if dst >= 0:
            os.close(dst)
    digest = h.hexdigest()
    if copy_to is not None:
        _set_times(copy_to, name, st)
    # Only cache what did not change under us while reading.
    elif cache is not None and HashCache.key(fst) == HashCache.key(st):
        cache.put(st, digest)
    return digest


def _set_times(dir_fd: int, name: str, st: os.stat_result) -> None:
    # COPY keeps modification times: a staged file must carry the caller's.
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


class _Walker:
    def __init__(
        self,
        matcher: Matcher,
        caller: Caller,
        cache: HashCache | None,
        keep: bool,
        staging: bool = False,
    ) -> None:
        self.matcher = matcher
        self.caller = caller
        self.cache = None if staging else cache  # a staged file is hashed as it is copied
        self.keep = keep
        self.staging = staging
        self.lines: list[bytes] = []
        self.result = ContextDigest(key="", dockerfile="")

    def denied(self, rel: str) -> Forbidden:
        return Forbidden(
            f"context entry {rel!r} is not readable by uid {self.caller.uid}; "
            "make it readable or add it to .dockerignore",
            details={"path": rel},
        )

    def walk(self, dir_fd: int, prefix: str, dest: int | None = None) -> None:
        """Hash the tree at ``dir_fd``; with ``dest`` (staging) also copy every kept entry
        there, hashing the bytes as they are copied. Each entry is opened first and judged by
        the fstat of what was opened (the module docstring says why)."""
        with os.scandir(dir_fd) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        for entry in entries:
            rel = prefix + entry.name
            # readdir's type (no syscall): only to skip what need not be opened at all.
            looks_dir = entry.is_dir(follow_symlinks=False)
            excluded = self.matcher.excluded(rel)
            if excluded:
                self.result.excluded += 1
                if not (looks_dir and self.matcher.has_exceptions):
                    continue
            special = not (looks_dir or entry.is_file(follow_symlinks=False) or entry.is_symlink())
            try:
                fd, st = open_entry(dir_fd, entry.name, rel, directory=looks_dir, special=special)
            except PermissionError:
                if excluded:
                    continue
                raise self.denied(rel) from None
            try:
                self._entry(fd, st, entry.name, rel, dest, excluded)
            finally:
                os.close(fd)

    def _entry(
        self, fd: int, st: os.stat_result, name: str, rel: str, dest: int | None, excluded: bool
    ) -> None:
        if stat.S_ISDIR(st.st_mode):
            if not self.caller.may(st, 5):
                if excluded:
                    return
                raise self.denied(rel)
            if not excluded:
                self._add(b"d", rel, st, b"")
            if dest is None:
                self.walk(fd, rel + "/")
            else:
                self._walk_staged(fd, rel, name, st, dest, excluded)
        elif excluded:
            return  # readdir said directory (kept for its exceptions); it is not one now
        elif stat.S_ISREG(st.st_mode):
            if not self.caller.may(st, 4):
                raise self.denied(rel)
            digest = _hash_file(fd, name, st, self.cache, dest)
            self.result.files += 1
            self.result.bytes += st.st_size
            self._add(b"f", rel, st, digest.encode())
        else:  # a link, as an O_PATH fd of the link itself
            target = os.readlink("", dir_fd=fd)
            if dest is not None:
                os.symlink(target, name, dir_fd=dest)
                _set_times(dest, name, st)
            self._add(b"l", rel, st, os.fsencode(target))

    def _walk_staged(
        self, sub: int, rel: str, name: str, st: os.stat_result, dest: int, excluded: bool
    ) -> None:
        os.mkdir(name, 0o700, dir_fd=dest)
        sub_dest = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dest
        )
        try:
            self.walk(sub, rel + "/", sub_dest)
            # An excluded directory is there only for the exceptions it holds.
            if excluded and not os.listdir(sub_dest):
                os.rmdir(name, dir_fd=dest)
                return
            os.fchmod(sub_dest, stat.S_IMODE(st.st_mode))
        finally:
            os.close(sub_dest)
        _set_times(dest, name, st)

    def _add(self, kind: bytes, rel: str, st: os.stat_result, data: bytes) -> None:
        path = os.fsencode(rel)
        line = b"%s %s %o %s\n" % (kind, path, st.st_mode, data)
        self.lines.append(line)
        self.result.items.append((kind, path, st.st_mode, data))
        if self.keep:
            self.result.entries.append(line.decode("utf-8", "replace").rstrip("\n"))


def hash_context(
    root_fd: int,
    dockerfile: str,
    *,
    build_args: dict[str, str] | None = None,
    stage: str | None = None,
    platform: str | None = None,
    secret_ids: list[str] | None = None,
    caller: Caller = ROOT,
    cache: HashCache | None = None,
    keep_entries: bool = False,
    stage_into: int | None = None,
) -> ContextDigest:
    """The base image's content key for the context open at ``root_fd`` (blocking: run it in a
    thread). Raises BadRequest for a bad Dockerfile path, Forbidden for an unreadable entry.

    ``secret_ids`` go into the key, their values never do: the key is a public tag, and the hash
    of a short secret is as good as the secret. So a changed secret value does not rebuild
    (``force`` does), as with BuildKit, whose cache ignores secret values too.

    With ``stage_into`` (an empty directory's fd), also copy there what the build may see: every
    entry ``.dockerignore`` keeps, plus the Dockerfile and ``.dockerignore`` themselves, with
    modes and modification times; the key is then of exactly the bytes copied (no hash cache).
    Why a copy: a builder given ``/dev/fd/N`` resolves it to the directory's *path* (buildah and
    BuildKit's file sync both evaluate symlinks), and that path names another directory, or
    none, when the caller is in another mount namespace (a workspace container). The copy is
    also what the key describes: a file changed after the request cannot slip into an image
    tagged with the old key (the caller compares the keys)."""
    dest_fd = stage_into
    if dest_fd is not None:
        cache = None
    st = os.fstat(root_fd)
    if not stat.S_ISDIR(st.st_mode):
        raise BadRequest("the context fd is not a directory; pass an open directory")
    if not caller.may(st, 5):
        raise Forbidden(f"the context directory is not readable by uid {caller.uid}")
    df_path = resolve_dockerfile(root_fd, dockerfile)
    df_bytes = _read_small(root_fd, df_path, caller, _MAX_DOCKERFILE, "the Dockerfile")
    ignore_bytes: bytes | None = None
    with contextlib.suppress(FileNotFoundError):
        ignore_bytes = _read_small(
            root_fd, ".dockerignore", caller, _MAX_DOCKERIGNORE, "the ignore file"
        )
    ignore_text = (ignore_bytes or b"").decode("utf-8", "replace")
    walker = _Walker(
        Matcher.from_text(ignore_text), caller, cache, keep_entries, staging=dest_fd is not None
    )
    # scandir(fd) consumes the fd's position: walk a duplicate.
    dup = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        walker.walk(dup, "", dest_fd)
    finally:
        os.close(dup)
    if dest_fd is not None:
        # The builder reads both even when .dockerignore leaves them out (as Docker sends them).
        _put(dest_fd, df_path, df_bytes)
        if ignore_bytes is not None:
            _put(dest_fd, ".dockerignore", ignore_bytes)
        os.fchmod(dest_fd, stat.S_IMODE(st.st_mode) | 0o500)
    h = hashlib.sha256()
    h.update(b"build-agent context key\nprocess %s\n" % PROCESS_VERSION.encode())
    h.update(b"dockerfile %d\n" % len(df_bytes))
    h.update(df_bytes)
    for k, v in sorted((build_args or {}).items()):
        h.update(b"arg %d %s=%s\n" % (len(k), k.encode(), v.encode()))
    h.update(b"stage %s\nplatform %s\n" % ((stage or "").encode(), (platform or "").encode()))
    if secret_ids:  # absent without secrets: keys of builds without secrets stay as they were
        h.update(b"secrets %s\n" % ",".join(sorted(secret_ids)).encode())
    h.update(b"entries %d\n" % len(walker.lines))
    for line in walker.lines:
        h.update(line)
    walker.result.key = h.hexdigest()
    walker.result.dockerfile = df_path
    walker.result.dockerfile_text = df_bytes.decode("utf-8", "replace")
    return walker.result


def _put(dest_fd: int, rel: str, data: bytes) -> None:
    """Write ``data`` at ``rel`` in the staging tree unless the walk copied it already (the
    walk's copy and ``data`` were read from the same file)."""
    parts = rel.split("/")
    parent = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dest_fd)
    try:
        for name in parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent)
            sub = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
            )
            os.close(parent)
            parent = sub
        try:
            fd = os.open(
                parts[-1],
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=parent,
            )
        except FileExistsError:
            return
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    finally:
        os.close(parent)


__all__ = [
    "ROOT",
    "Caller",
    "ContextDigest",
    "HashCache",
    "hash_context",
]
