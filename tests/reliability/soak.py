"""A control-plane soak driver shared by tests/reliability/test_soak.py and bench/soak.py.

``clients`` connections at once, each sending ``requests`` requests one after the other, in a
fixed mix: ping, info, status, list, logs (a chunk) and logs with ``follow`` of a finished build
(a stream of ``log`` events, then the result). Every reply is checked; latency is per request,
from the write of the request to its final frame.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from ctl import protocol

_HEADER = struct.Struct(">I")
MIX = ("ping", "info", "status", "list", "logs", "follow", "ping", "status")


@dataclass
class SoakResult:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    events: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def pct(self, p: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    def summary(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "errors": len(self.errors),
            "events": self.events,
            "seconds": self.seconds,
            "rps": self.requests / self.seconds if self.seconds else 0.0,
            "p50_ms": self.pct(50) * 1000,
            "p99_ms": self.pct(99) * 1000,
            "max_ms": self.pct(100) * 1000,
        }


def _args(op: str, build_id: str) -> tuple[str, dict[str, Any]]:
    if op in ("ping", "info"):
        return op, {}
    if op == "status":
        return op, {"id": build_id}
    if op == "list":
        return op, {"limit": 20}
    if op == "logs":
        return op, {"id": build_id, "offset": 0}
    return "logs", {"id": build_id, "offset": 0, "follow": True}


async def _client(
    path: str, n: int, build_id: str, log_size: int, idx: int, out: SoakResult
) -> None:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        for i in range(n):
            kind = MIX[(i + idx) % len(MIX)]
            op, args = _args(kind, build_id)
            t0 = time.perf_counter()
            writer.write(protocol.encode(protocol.request(i + 1, op, args)))
            streamed = 0
            while True:
                (length,) = _HEADER.unpack(await reader.readexactly(4))
                reply = protocol.decode(await reader.readexactly(length))
                if reply.get("id") != i + 1:
                    out.errors.append(f"{kind}: reply for id {reply.get('id')}, sent {i + 1}")
                    return
                if "event" in reply:
                    out.events += 1
                    if reply["event"] == "log":
                        streamed += len(reply["data"]["data"])
                    continue
                break
            out.latencies.append(time.perf_counter() - t0)
            out.requests += 1
            if reply.get("ok") is not True:
                out.errors.append(f"{kind}: {reply.get('error')}")
            elif kind == "follow" and streamed != log_size:
                out.errors.append(f"follow streamed {streamed} of {log_size} characters")
            elif kind == "logs" and len(reply["result"]["data"]) != log_size:
                out.errors.append(f"logs gave {len(reply['result']['data'])} of {log_size}")
    finally:
        writer.close()


async def soak(path: str, clients: int, requests: int, build_id: str, log_size: int) -> SoakResult:
    """Run the soak against the daemon at ``path``; ``build_id`` is a finished build whose log
    holds ``log_size`` characters."""
    out = SoakResult()
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(_client(path, requests, build_id, log_size, i, out) for i in range(clients)),
        return_exceptions=True,
    )
    out.seconds = time.perf_counter() - t0
    out.errors.extend(repr(r) for r in results if isinstance(r, BaseException))
    return out


def run_soak(path: str, clients: int, requests: int, build_id: str, log_size: int) -> SoakResult:
    import uvloop

    return uvloop.run(soak(path, clients, requests, build_id, log_size))
