"""From a frame's body to a request the server may run: its id, version, op and args.

The checks run in the order docs/protocol.md gives ("Errors"): the body is a msgpack map, ``id`` is
an integer in range (else the reply's id is null), ``v`` is this protocol's version, ``op`` is a
registered op, ``args`` is a map with string keys. A failed check raises :class:`Refused`, which
the server turns into an error reply; the checks that need the connection (access, ids in flight)
are the server's.
"""

from __future__ import annotations

from typing import Any

from agent.control.ops import Op, Registry
from ctl import protocol


class Refused(Exception):
    """A request answered with an error before any handler ran; ``label`` is its metrics op."""

    def __init__(
        self,
        req_id: int | None,
        label: str,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.req_id = req_id
        self.label = label
        self.code = code
        self.message = message
        self.details = details

    def reply(self) -> bytes:
        return protocol.encode(
            protocol.reply_error(self.req_id, self.code, self.message, self.details)
        )


def read_request(body: bytes, registry: Registry) -> tuple[int, Op, dict[str, Any]]:
    """The request's id, op and args; raises :class:`Refused`."""
    try:
        msg = protocol.decode(body)
    except protocol.FrameError as exc:
        raise Refused(None, "invalid", protocol.BAD_REQUEST, str(exc)) from None
    req_id = _request_id(msg)
    _check_version(msg, req_id)
    op = _find_op(msg, req_id, registry)
    return req_id, op, _args_of(msg, req_id, op.name)


def _request_id(msg: dict[str, Any]) -> int:
    req_id = msg.get("id")
    if type(req_id) is not int or not 0 <= req_id <= protocol.MAX_REQUEST_ID:
        raise Refused(
            None,
            "invalid",
            protocol.BAD_REQUEST,
            f"request id must be an integer from 0 to {protocol.MAX_REQUEST_ID}, got {req_id!r}",
        )
    return req_id


def _check_version(msg: dict[str, Any], req_id: int) -> None:
    version = msg.get("v")
    if version != protocol.VERSION or type(version) is not int:
        raise Refused(
            req_id,
            "invalid",
            protocol.UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported; this daemon speaks "
            f"v{protocol.VERSION} (upgrade agentctl or the daemon so they match)",
            {"supported": [protocol.VERSION]},
        )


def _find_op(msg: dict[str, Any], req_id: int, registry: Registry) -> Op:
    name = msg.get("op")
    op = registry.get(name) if type(name) is str else None
    if op is None:
        raise Refused(
            req_id,
            "unknown",
            protocol.BAD_REQUEST,
            f"unknown op {name!r}; this daemon knows: {', '.join(registry.names())}",
            {"ops": registry.names()},
        )
    return op


def _args_of(msg: dict[str, Any], req_id: int, op_name: str) -> dict[str, Any]:
    args = msg.get("args")
    if args is None:
        return {}
    if type(args) is not dict or not all(type(k) is str for k in args):
        raise Refused(
            req_id,
            op_name,
            protocol.BAD_REQUEST,
            f"args must be a map with string keys, got {_describe(args)}",
        )
    return args


def _describe(value: Any) -> str:
    return "a map with non-string keys" if isinstance(value, dict) else type(value).__name__
