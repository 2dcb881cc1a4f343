"""Raw-socket helpers for protocol tests: send exact bytes, read frames, see the socket close."""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

from ctl import protocol


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_msg(s: socket.socket) -> dict[str, Any]:
    (length,) = struct.unpack(">I", recv_exact(s, 4))
    return protocol.decode(recv_exact(s, length))


def is_closed(s: socket.socket) -> bool:
    """True when the peer closed (EOF or reset) before sending anything more."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
