"""What the reliability tests share: sizes, a daemon on the BuildKit stand-ins or on real buildah
(``TOOLCHAINS``, ``toolchain_daemon``, for the cases where the builder matters), one build driven
through the real client from any thread, the daemon's memory and fds, and the state-directory
integrity check every fault test ends with."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ctl.client import Client, DaemonUnreachable, RequestFailed
from tests.infra.builds import build_sections, log_of, status, wait_for
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry
from tests.standins import Standins, install

FINAL = {"succeeded", "failed", "cancelled", "timed_out", "interrupted"}

# Parametrise a test with this where the builder matters: the BuildKit stand-ins are fast, real
# buildah (RUN steps in runc, its own push and retries) is what a buildah node runs.
TOOLCHAINS = [
    "buildkit",
    pytest.param(
        "buildah",
        marks=pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah"),
    ),
]


def scale(small: int, full: int) -> int:
    """``small`` by default; ``full`` with RELIABILITY_SCALE=full; a number scales ``full``."""
    how = os.environ.get("RELIABILITY_SCALE", "small")
    if how == "small":
        return small
    if how == "full":
        return full
    return max(1, round(full * float(how)))


def standin_daemon(
    tmp: Path,
    registry: Registry,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    start: bool = True,
) -> tuple[DaemonProcess, Standins]:
    """A real daemon with ``toolchain = "buildkit"`` run by the stand-ins in ``tmp/bin``."""
    standins = install(tmp / "bin")
    merged: dict[str, dict[str, Any]] = {"build": {"toolchain": "buildkit"}}
    for name, table in (extra or {}).items():
        merged.setdefault(name, {}).update(table)
    sections = build_sections([registry], merged)
    d = DaemonProcess(tmp / "d", sections, env={**standins.env(), **(env or {})})
    if start:
        d.start(timeout=30)
    return d, standins


def toolchain_daemon(
    tmp: Path,
    registry: Registry,
    toolchain: str,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> DaemonProcess:
    """A started daemon on ``toolchain``: "buildkit" (the stand-ins in ``tmp/bin``) or
    "buildah" (the real one; ``tmp/bin`` is left to gates)."""
    if toolchain == "buildkit":
        return standin_daemon(tmp, registry, extra, env=env)[0]
    sections = build_sections([registry], {"build": {"toolchain": "buildah"}})
    for name, table in (extra or {}).items():
        sections.setdefault(name, {}).update(table)
    return DaemonProcess(tmp / "d", sections, env=dict(env or {})).start(timeout=30)


@dataclass
class Outcome:
    """What one caller saw: the build id, final state, error code, events and latency."""

    id: str = ""
    state: str = ""
    code: str = ""
    message: str = ""
    joined: bool = False
    cache: dict[str, Any] = field(default_factory=dict)
    log_bytes: int = 0
    seconds: float = 0.0


def run_build(
    socket_path: str,
    context: Path | None,
    args: Mapping[str, Any],
    *,
    timeout: float = 120.0,
) -> Outcome:
    """One ``build`` request over its own connection, following its stream to the end."""
    out = Outcome()
    t0 = time.monotonic()
    fds = [os.open(context, os.O_RDONLY | os.O_DIRECTORY)] if context is not None else []
    req = dict(args)
    if context is not None:
        req.setdefault("dockerfile", "Dockerfile")
        req.setdefault("context_name", str(context))
    try:
        with Client.connect(socket_path, timeout=timeout) as c:
            call = c.start("build", req, fds=fds)
            for fd in fds:
                os.close(fd)
            fds = []
            try:
                for ev in call:
                    if ev.name == "build":
                        out.id = ev.data["id"]
                        out.joined = bool(ev.data.get("joined"))
                    elif ev.name == "log":
                        out.log_bytes += len(ev.data["data"])
                result = call.result()
                out.state = result["state"]
                out.cache = result.get("cache") or {}
                out.id = result["id"]
            except RequestFailed as exc:
                out.code, out.message = exc.code, str(exc)
                out.id = out.id or str((exc.details or {}).get("id", ""))
            except DaemonUnreachable as exc:  # the daemon went away mid-stream
                out.code, out.message = "unreachable", str(exc)
    finally:
        for fd in fds:
            os.close(fd)
    out.seconds = time.monotonic() - t0
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def settled_rss_kb(pid: int, timeout: float = 5.0) -> int:
    """RSS once two readings 50 ms apart agree within 256 KiB (or at the deadline)."""
    deadline = time.monotonic() + timeout
    last = rss_kb(pid)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = rss_kb(pid)
        if abs(now - last) < 256:
            return now
        last = now
    return last


def _tcp_remote_ports(pid: int) -> dict[str, int]:
    """socket inode -> remote port of every established TCP connection in pid's namespace."""
    out: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01":  # ESTABLISHED
                out[f[9]] = int(f[2].rsplit(":", 1)[1], 16)
    return out


def fd_census(pid: int, upstream_port: int) -> tuple[int, int]:
    """(fds other than pooled upstream connections, keep-alive connections to ``upstream_port``).

    The proxy keeps idle upstream connections in aiohttp's pool (bounded, closed after the
    keep-alive timeout): those are reuse, not a leak, so they are counted apart."""
    remote = _tcp_remote_ports(pid)
    own = pooled = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        inode = target[len("socket:[") : -1] if target.startswith("socket:[") else ""
        if inode and remote.get(inode) == upstream_port:
            pooled += 1
        else:
            own += 1
    return own, pooled


def settled_census(
    pid: int, upstream_port: int, expected_own: int | None = None, timeout: float = 10.0
) -> tuple[int, int]:
    """fd_census once the own count equals ``expected_own`` or stops changing (the deadline)."""
    deadline = time.monotonic() + timeout
    last, same = fd_census(pid, upstream_port), 0
    while time.monotonic() < deadline:
        if expected_own is not None and last[0] == expected_own:
            return last
        if expected_own is None and same >= 5:
            return last
        time.sleep(0.02)
        now = fd_census(pid, upstream_port)
        same = same + 1 if now[0] == last[0] else 0
        last = now
    return last


def check_state_dir(state_dir: Path, *, all_final: bool = True) -> list[dict[str, Any]]:
    """Every record parses, names its own file and (by default) is in a final state; every log
    is readable text. No temp file is left. Returns the records."""
    builds = state_dir / "builds"
    records = []
    for path in sorted(builds.glob("*.json")):
        record = json.loads(path.read_bytes())
        assert record["id"] == path.stem, path
        if all_final:
            assert record["state"] in FINAL, (path, record["state"])
        log = builds / f"{path.stem}.log"
        if log.exists():
            log.read_bytes().decode("utf-8")
        records.append(record)
    assert not list(builds.glob(".*.tmp")), "a temp record was left behind"
    assert not list(builds.glob("*.bad")), "a record was moved aside as unreadable"
    return records


def wait_log(d: DaemonProcess, build_id: str, needle: str, timeout: float = 30.0) -> None:
    wait_for(lambda: needle in log_of(d, build_id), timeout, f"{needle!r} in the log of {build_id}")


def wait_final(d: DaemonProcess, build_id: str, timeout: float = 60.0) -> dict[str, Any]:
    result: dict[str, Any] = wait_for(
        lambda: (s := status(d, build_id))["state"] in FINAL and s, timeout, "a final state"
    )
    return result


def pids_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists()]


@dataclass(frozen=True)
class Gate:
    """A wrapper that holds a tool before it runs: it appends its pid to ``started`` and waits for
    ``go`` to exist, then execs the real tool with the same argv (the daemon's child is the
    wrapper's pid throughout, so killing it is killing the tool mid-run)."""

    path: Path
    started: Path
    go: Path

    def pids(self) -> list[int]:
        if not self.started.exists():
            return []
        return [int(x) for x in self.started.read_text().split()]

    def wait_started(self, timeout: float = 30.0) -> int:
        pids: list[int] = wait_for(self.pids, timeout, f"{self.path.name} to start")
        return pids[-1]

    def open(self) -> None:
        self.go.touch()


def make_gate(bindir: Path, name: str, real: str) -> Gate:
    bindir.mkdir(parents=True, exist_ok=True)
    gate = Gate(bindir / name, bindir / f"{name}.started", bindir / f"{name}.go")
    gate.path.write_text(
        "#!/bin/sh\n"
        f"echo $$ >> '{gate.started}'\n"
        f"while [ ! -e '{gate.go}' ]; do sleep 0.05; done\n"
        f"exec '{real}' \"$@\"\n"
    )
    gate.path.chmod(0o755)
    return gate


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
