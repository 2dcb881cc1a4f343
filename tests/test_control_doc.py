"""docs/protocol.md's example exchange is what the real daemon sends, byte for byte."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any

from ctl import protocol
from tests.infra.daemon import REPO, DaemonProcess
from tests.infra.wire import connect, recv_exact

Factory = Callable[..., DaemonProcess]
DOC = REPO / "docs" / "protocol.md"
BEGIN, END = "<!-- hex:begin -->", "<!-- hex:end -->"

EXCHANGES: list[tuple[str, dict[str, Any]]] = [
    ("Ping", protocol.request(1, "ping")),
    (
        "An invalid argument type (the connection stays usable)",
        {"v": 1, "id": 2, "op": "ping", "args": []},
    ),
    ("An unsupported protocol version", {"v": 2, "id": 3, "op": "ping", "args": {}}),
]


def hexdump(data: bytes) -> str:
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk).ljust(47)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:04x}  {hexes}  {text}")
    return "\n".join(lines)


def render(d: DaemonProcess) -> str:
    parts = []
    with connect(d.socket_path) as s:
        for title, req in EXCHANGES:
            frame = protocol.encode(req)
            s.sendall(frame)
            header = recv_exact(s, 4)
            (length,) = struct.unpack(">I", header)
            body = recv_exact(s, length)
            parts.append(
                f"**{title}.** Request `{json.dumps(req)}`:\n\n```\n{hexdump(frame)}\n```\n\n"
                f"Reply `{json.dumps(protocol.decode(body))}`:\n\n"
                f"```\n{hexdump(header + body)}\n```\n"
            )
    event = protocol.event(4, "log", "step 1/2\n")
    parts.append(
        "**An event** (as a streaming op sends it; encoded by `ctl.protocol.event`): "
        f"`{json.dumps(event)}`:\n\n```\n{hexdump(protocol.encode(event))}\n```\n"
    )
    return "\n".join(parts)


def test_protocol_doc_hex_matches_the_daemon(daemon_factory: Factory) -> None:
    d = daemon_factory()
    generated = render(d)
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    current, tail = rest.split(END, 1)
    if os.environ.get("UPDATE_DOCS"):
        DOC.write_text(f"{head}{BEGIN}\n{generated}{END}{tail}")
        return
    assert current.strip() == generated.strip(), "run with UPDATE_DOCS=1 to regenerate"
