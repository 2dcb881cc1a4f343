"""The control protocol's wire format, shared by the daemon and agentctl (docs/protocol.md).

A frame is a 4-byte big-endian unsigned length followed by that many bytes holding exactly one
msgpack map. Requests are ``{v, id, op, args}``; a reply is ``{id, ok: true, result}`` or
``{id, ok: false, error: {code, message, details}}``; a streaming op sends any number of
``{id, event, data}`` frames before its reply. This module holds only pure functions and constants:
no sockets, no event loop, so both the asyncio daemon and the blocking client use it.
"""

from __future__ import annotations

import re
import struct

import msgpack

# typing is not imported at run time: agentctl's start-up is measured (bench/control_plane.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

VERSION: Final = 1
HEADER: Final = struct.Struct(">I")

# Limits both sides keep; each is documented in docs/protocol.md.
# The daemon's request cap (its daemon.max_frame, which operators may raise) by default.
DEFAULT_MAX_FRAME: Final = 1 << 20
# The largest frame agentctl sends or accepts: replies (log chunks, lists) may exceed the daemon's
# request cap, so the daemon lets its replies grow to this.
CLIENT_MAX_FRAME: Final = 16 << 20
# File descriptors one message may carry (SCM_RIGHTS); more is a protocol error.
MAX_FDS: Final = 16
# Request ids are integers from 0 to this (msgpack's signed 64-bit range).
MAX_REQUEST_ID: Final = 2**63 - 1
# Build secrets (the build op's ``args.secrets``): at most MAX_SECRETS ids matching SECRET_ID,
# each value at most MAX_SECRET_BYTES: BuildKit's own per-secret cap
# (``secretsprovider.MaxSecretSize = 500 * 1024``), so a value either toolchain accepts is
# accepted and nothing more.
MAX_SECRETS: Final = 32
MAX_SECRET_BYTES: Final = 500 * 1024
SECRET_ID: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")

# The closed set of error codes (DESIGN section 5). Adding one is a protocol change.
BAD_REQUEST: Final = "bad_request"
UNSUPPORTED_VERSION: Final = "unsupported_version"
FORBIDDEN: Final = "forbidden"
NOT_FOUND: Final = "not_found"
BUSY: Final = "busy"
BUILD_FAILED: Final = "build_failed"
CANCELLED: Final = "cancelled"
TIMED_OUT: Final = "timed_out"
UPSTREAM_UNAUTHORIZED: Final = "upstream_unauthorized"
UPSTREAM_UNAVAILABLE: Final = "upstream_unavailable"
INTERNAL: Final = "internal"

ERROR_CODES: Final = frozenset(
    {
        BAD_REQUEST,
        UNSUPPORTED_VERSION,
        FORBIDDEN,
        NOT_FOUND,
        BUSY,
        BUILD_FAILED,
        CANCELLED,
        TIMED_OUT,
        UPSTREAM_UNAUTHORIZED,
        UPSTREAM_UNAVAILABLE,
        INTERNAL,
    }
)


class FrameError(Exception):
    """The byte stream is not a valid sequence of frames; the connection cannot continue."""


def encode(message: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Serialise one message into a frame (header + msgpack body)."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameError(f"frame of {len(body)} bytes exceeds the limit of {max_frame}")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> int:
    """Length announced by a 4-byte header, refusing anything over ``max_frame``."""
    (length,) = HEADER.unpack(header)
    if length > max_frame:
        raise FrameError(f"frame of {length} bytes announced; the limit is {max_frame}")
    return int(length)


def decode(body: bytes) -> dict[str, Any]:
    """Parse a frame body; anything but a single msgpack map with string keys is a FrameError."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise FrameError(f"frame is not valid msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise FrameError(f"frame holds a {type(message).__name__}, not a map")
    return message


def request(req_id: int, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id, "op": op, "args": args or {}}


def reply_ok(req_id: int | None, result: Any) -> dict[str, Any]:
    return {"id": req_id, "ok": True, "result": result}


def reply_error(
    req_id: int | None, code: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return {
        "id": req_id,
        "ok": False,
        "error": {"code": code, "message": message, "details": details or {}},
    }


def event(req_id: int, name: str, data: Any) -> dict[str, Any]:
    return {"id": req_id, "event": name, "data": data}
