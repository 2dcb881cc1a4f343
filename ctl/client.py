"""A blocking client of the control socket (docs/protocol.md), used by agentctl and tests.

    with Client.connect(path) as client:
        client.call("ping")                                   # -> result, or raises RequestFailed
        call = client.start("build", {...}, fds=[dir_fd])     # a request that streams events
        for event in call:                                    # Event(name, data) until the reply
            ...
        result = call.result()

Several calls may be in flight on one client; frames of other calls read while waiting are kept
for them. Errors: :class:`DaemonUnreachable` (cannot connect, or the connection dropped),
:class:`RequestFailed` (the daemon answered with an error: ``code``, ``message``, ``details``),
:class:`ProtocolError` (the daemon sent something that is not the protocol). All are
:class:`ClientError`.
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import socket
from collections import deque

from ctl import protocol

# No typing/dataclasses at run time: agentctl's start-up is measured (bench/control_plane.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any

DEFAULT_SOCKET = "/run/build-agent/agent.sock"
SOCKET_ENV = "AGENT_SOCKET"


def default_socket_path() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class ClientError(Exception):
    """Base of agentctl's errors."""


class DaemonUnreachable(ClientError):
    """The daemon's socket cannot be reached; ``message`` says what to try."""

    def __init__(self, message: str, *, path: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.reason = reason  # "missing", "refused", "permission", "closed", "timeout", "other"


class ProtocolError(ClientError):
    """The daemon sent bytes that are not a valid reply."""


class RequestFailed(ClientError):
    """The daemon answered a request with an error (one of ``ctl.protocol.ERROR_CODES``)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


class Event:
    """A stream event of a request: ``name`` and ``data`` as the op documents them."""

    __slots__ = ("data", "name")

    def __init__(self, name: str, data: Any) -> None:
        self.name = name
        self.data = data

    def __repr__(self) -> str:
        return f"Event({self.name!r}, {self.data!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and (self.name, self.data) == (other.name, other.data)

    __hash__ = None  # type: ignore[assignment]


_PENDING = object()


class Call:
    """One request in flight: iterate it for its events, then :meth:`result`."""

    def __init__(self, client: Client, req_id: int, op: str) -> None:
        self.client = client
        self.id = req_id
        self.op = op
        self.events: deque[Event] = deque()
        self.reply: Any = _PENDING

    def __iter__(self) -> Iterator[Event]:
        while True:
            if self.events:
                yield self.events.popleft()
                continue
            if self.reply is not _PENDING:
                return
            self.client._pump()

    def result(self) -> Any:
        """The op's result (events not yet read are dropped); raises RequestFailed."""
        while self.reply is _PENDING:
            self.client._pump()
        self.events.clear()
        reply = self.reply
        if reply.get("ok") is True:
            return reply.get("result")
        err = reply.get("error")
        if not isinstance(err, dict):
            raise ProtocolError(f"reply to request {self.id} has neither result nor error")
        raise RequestFailed(
            str(err.get("code", protocol.INTERNAL)),
            str(err.get("message", "")),
            err.get("details") if isinstance(err.get("details"), dict) else {},
        )


def unreachable(path: str, exc: OSError) -> DaemonUnreachable:
    """The error for a failed connect, with what a newcomer should try."""
    if isinstance(exc, FileNotFoundError):
        return DaemonUnreachable(
            f"no daemon socket at {path}. Is the daemon running? Check `systemctl status "
            f"build-agent`; if it listens elsewhere pass --socket PATH or set {SOCKET_ENV}.",
            path=path,
            reason="missing",
        )
    if isinstance(exc, PermissionError):
        group = _socket_group(path)
        join = (
            f"join the group {group!r} that owns it (sudo usermod -aG {group} $USER, then log "
            "in again)"
            if group
            else "ask an operator to add your user to the socket's group"
        )
        return DaemonUnreachable(
            f"permission denied on {path} (uid {os.getuid()}): {join}.",
            path=path,
            reason="permission",
        )
    if isinstance(exc, ConnectionRefusedError):
        return DaemonUnreachable(
            f"nothing is listening on {path} (a stale socket: did the daemon crash? "
            "Check `systemctl status build-agent` and `journalctl -u build-agent`).",
            path=path,
            reason="refused",
        )
    if isinstance(exc, TimeoutError):
        return DaemonUnreachable(
            f"the daemon at {path} did not answer in time", path=path, reason="timeout"
        )
    return DaemonUnreachable(
        f"cannot connect to {path}: {exc.strerror or exc}", path=path, reason="other"
    )


def _socket_group(path: str) -> str:
    import grp

    for candidate in (path, os.path.dirname(path)):
        try:
            return grp.getgrgid(os.stat(candidate).st_gid).gr_name
        except (OSError, KeyError):
            continue
    return ""


class Client:
    """A connection to the daemon. Not thread-safe; use one per thread."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self.path = path
        self._ids = itertools.count(1)
        self._calls: dict[int, Call] = {}
        self._buf = bytearray()

    @classmethod
    def connect(cls, path: str | None = None, *, timeout: float | None = None) -> Client:
        path = path or default_socket_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise unreachable(path, exc) from exc
        return cls(sock, path)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def start(
        self, op: str, args: dict[str, Any] | None = None, *, fds: Sequence[int] = ()
    ) -> Call:
        """Send a request (with ``fds`` passed by SCM_RIGHTS) and return its pending Call."""
        req_id = next(self._ids)
        # The daemon's own cap is daemon.max_frame (1 MiB by default, its operator may raise it):
        # it is the one to refuse, with a message naming the key. Only what no daemon could take
        # is refused here.
        try:
            frame = protocol.encode(protocol.request(req_id, op, args), protocol.CLIENT_MAX_FRAME)
        except protocol.FrameError as exc:
            raise RequestFailed(
                protocol.BAD_REQUEST, f"the request is too large to send: {exc}"
            ) from None
        call = Call(self, req_id, op)
        self._calls[req_id] = call
        try:
            if fds:
                # The fds travel in a sendmsg holding this frame alone (docs/protocol.md, 9).
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = self._sock.sendmsg([frame], ancillary)
                if sent < len(frame):
                    self._sock.sendall(frame[sent:])
            else:
                self._sock.sendall(frame)
        except TimeoutError as exc:
            raise unreachable(self.path, exc) from exc
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                self._refusal()  # raises the daemon's reason when it sent one before closing
            raise self._dropped(exc) from exc
        return call

    def _refusal(self) -> None:
        """After a failed send: the daemon may have refused the frame (over daemon.max_frame)
        with an ``id: null`` error and closed; raise that error if it is waiting to be read."""
        try:
            self._sock.settimeout(1.0)
            self._pump()
        except RequestFailed:
            raise
        except (ClientError, OSError):
            return

    def call(self, op: str, args: dict[str, Any] | None = None, *, fds: Sequence[int] = ()) -> Any:
        """Send a request and wait for its result, dropping any stream events."""
        return self.start(op, args, fds=fds).result()

    def _dropped(self, exc: OSError | None = None) -> DaemonUnreachable:
        why = f": {exc.strerror}" if exc is not None and exc.strerror else ""
        return DaemonUnreachable(
            f"the daemon closed the connection{why} (is it shutting down? "
            "`systemctl status build-agent`)",
            path=self.path,
            reason="closed",
        )

    def _pump(self) -> None:
        """Read until at least one whole frame has been routed to its call."""
        while True:
            if len(self._buf) >= 4:
                try:
                    length = protocol.frame_length(bytes(self._buf[:4]), protocol.CLIENT_MAX_FRAME)
                except protocol.FrameError as exc:
                    raise ProtocolError(str(exc)) from exc
                if len(self._buf) >= 4 + length:
                    body = bytes(self._buf[4 : 4 + length])
                    del self._buf[: 4 + length]
                    self._route(body)
                    return
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError as exc:
                raise unreachable(self.path, exc) from exc
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                    raise self._dropped(exc) from exc
                raise
            if not chunk:
                raise self._dropped()
            self._buf += chunk

    def _route(self, body: bytes) -> None:
        try:
            msg = protocol.decode(body)
        except protocol.FrameError as exc:
            raise ProtocolError(str(exc)) from exc
        req_id = msg.get("id")
        call = self._calls.get(req_id) if isinstance(req_id, int) else None
        if call is None:
            if req_id is None and msg.get("ok") is False:
                # The daemon could not tie the error to a request: the connection is unusable.
                err = msg.get("error") or {}
                raise RequestFailed(
                    str(err.get("code", protocol.BAD_REQUEST)), str(err.get("message", ""))
                )
            raise ProtocolError(f"frame for unknown request id {req_id!r}")
        if "event" in msg:
            call.events.append(Event(str(msg["event"]), msg.get("data")))
            return
        call.reply = msg
        del self._calls[call.id]
