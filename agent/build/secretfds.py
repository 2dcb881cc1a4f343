"""Build secrets as sealed memory files, the only form in which a value reaches a builder.

    {id: value} ──▶ memfd_create(MFD_CLOEXEC | MFD_ALLOW_SEALING), write, seal
                     (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL)
                ──▶ ((id, fd), ...) for BuildSpec.secrets; the toolchain passes the fds with
                     ``pass_fds`` and names them ``--secret id=<id>,src=/dev/fd/<fd>``
                ──▶ closed when the build call returns

A memfd lives in memory only (no path on any filesystem, so no disk, no leftover after a crash);
the seals make it read-only for everyone, the child that opens ``/dev/fd/<fd>`` included. The
value never goes on an argv or into an environment.

The limits are the wire's, kept with the protocol where agentctl checks them too
(``ctl.protocol.MAX_SECRETS``, ``SECRET_ID``, ``MAX_SECRET_BYTES``; docs/protocol.md, ``secrets``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def sealed_memfd(name: str, value: bytes) -> int:
    """A close-on-exec memfd holding ``value``, sealed against any change. The name is only
    what /proc/<pid>/fd shows (``memfd:secret-<id>``); it is an id, never a value."""
    fd = os.memfd_create(f"secret-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(value)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def secret_fds(secrets: Mapping[str, bytes]) -> Iterator[tuple[tuple[str, int], ...]]:
    """``((id, fd), ...)`` sorted by id, one sealed memfd each, all closed on exit."""
    opened: list[tuple[str, int]] = []
    try:
        for sid in sorted(secrets):
            opened.append((sid, sealed_memfd(sid, secrets[sid])))
        yield tuple(opened)
    finally:
        for _, fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)


def secret_flags(secrets: tuple[tuple[str, int], ...], *, file_type: bool = False) -> list[str]:
    """``--secret id=<id>,src=/dev/fd/<fd>`` for each secret, the form buildah bud and buildctl
    both take. buildah needs ``file_type``: without ``type=file`` it reads the *environment
    variable* named by the id whenever one exists (buildah pkg/parse ``Secrets``), so a secret
    called HOME or PATH would silently become that variable. buildctl reads ``src`` as a file."""
    out: list[str] = []
    for sid, fd in secrets:
        out += ["--secret", f"id={sid},src=/dev/fd/{fd}" + (",type=file" if file_type else "")]
    return out


__all__ = ["sealed_memfd", "secret_fds", "secret_flags"]
