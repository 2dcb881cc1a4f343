"""The control socket's listening side: bind it 0660 with its group, replacing a crash leftover."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat

from agent.errors import StartupError

_log = logging.getLogger("agent.control")


def bind_control_socket(path: str, group: str) -> socket.socket:
    """Create the listening socket at ``path``: mode 0660, group ``group`` when it exists.

    A leftover socket from a crash is replaced; a live one (another daemon) is a StartupError.
    """
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise StartupError(
            f"cannot create the directory of daemon.socket {path}: {exc.strerror}"
        ) from exc
    _remove_leftover(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o117)  # created 0660 from the start: no window with a wider mode
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind daemon.socket {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    if group:
        _give_to_group(path, group)
    sock.listen(512)
    return sock


def _remove_leftover(path: str) -> None:
    """Unlink a socket nobody listens on; refuse a live one, or anything not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(
            f"daemon.socket {path} exists and is not a socket; remove it or choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: nobody listens
    else:
        raise StartupError(
            f"another daemon is already listening on {path}; stop it first "
            "(systemctl stop build-agent) or set daemon.socket to another path"
        )
    finally:
        probe.close()


def _give_to_group(path: str, group: str) -> None:
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        _log.warning(
            "daemon.socket_group %r does not exist; %s stays owned by gid %d "
            "(create it with: groupadd --system %s)",
            group,
            path,
            os.getgid(),
            group,
        )
    else:
        os.chown(path, -1, gid)
