"""The registry proxy's listening socket inside the sandbox (DESIGN section 3).

A socket belongs to the network namespace it was created in, whichever thread later uses it. So a
short-lived thread switches into the sandbox's namespace, creates and binds the socket on
``127.0.0.1:<port>`` there, and ends; the daemon serves the socket from its event loop in the host
namespace, and children address the proxy as ``localhost:<port>`` exactly as bob's builds do.
"""

from __future__ import annotations

import socket

from agent.errors import StartupError
from agent.sandbox import _netns


def listen_inside(netns: str, port: int, *, backlog: int = 1024) -> socket.socket:
    """A non-blocking TCP socket listening on 127.0.0.1:``port`` inside ``netns``."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    try:
        return _netns.run_inside(netns, make)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on 127.0.0.1:{port} inside the sandbox's network namespace "
            f"{netns}: {exc.strerror or exc}; choose another proxy.port"
        ) from exc
