"""The systemd notification protocol (sd_notify(3)), implemented directly: one datagram per message.

``$NOTIFY_SOCKET`` names a Unix datagram socket (a leading ``@`` means the abstract namespace).
The daemon sends ``READY=1`` when every component is up, ``WATCHDOG=1`` at half of
``$WATCHDOG_USEC`` (only when ``$WATCHDOG_PID`` is unset or ours), ``STATUS=...`` lines, and
``STOPPING=1`` when shutdown begins. :func:`take_environment` reads these variables and removes them
(and systemd's ``LISTEN_*``) from ``os.environ`` so that no child ever inherits them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

_log = logging.getLogger("agent.daemon")

# Variables systemd hands to the main process only; a child must never see them.
SYSTEMD_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)

SD_LISTEN_FDS_START = 3


@dataclass(frozen=True)
class SystemdEnv:
    """What systemd told this process through its environment (already removed from it)."""

    notify_socket: str | None = None
    watchdog_usec: int | None = None
    listen_fds: int = 0
    listen_fdnames: tuple[str, ...] = ()


def take_environment(environ: MutableMapping[str, str] | None = None) -> SystemdEnv:
    """Read systemd's variables that are meant for this pid, then delete all of them."""
    env = os.environ if environ is None else environ
    values = {name: env.pop(name, None) for name in SYSTEMD_VARS}
    pid = os.getpid()

    watchdog: int | None = None
    wd_pid = values["WATCHDOG_PID"]
    if values["WATCHDOG_USEC"] and (wd_pid is None or wd_pid == str(pid)):
        try:
            watchdog = int(values["WATCHDOG_USEC"] or "0") or None
        except ValueError:
            watchdog = None

    listen = 0
    if values["LISTEN_PID"] == str(pid):
        try:
            listen = max(0, int(values["LISTEN_FDS"] or "0"))
        except ValueError:
            listen = 0
    names = tuple((values["LISTEN_FDNAMES"] or "").split(":")) if listen else ()
    return SystemdEnv(values["NOTIFY_SOCKET"] or None, watchdog, listen, names)


class Notifier:
    """Sends sd_notify datagrams; a no-op when there is no ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str | None) -> None:
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if address:
            self._address = ("\0" + address[1:]) if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # systemd gone or socket full: nothing useful to do but say so
            _log.warning("sd_notify to %s failed: %s", self._address, exc)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog(notifier: Notifier, usec: int) -> None:
    """Ping systemd's watchdog at half the interval for as long as the event loop turns."""
    interval = usec / 2_000_000
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval)
