"""Helpers for the sandbox tests: a config for one test's sandbox, running a command the way the
daemon runs children, snapshots of the host's namespaces/links/rules/mounts, and a stand-in
"internet host" network namespace reachable only through the host."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import config as config_mod
from agent.build import child as children
from agent.contracts import SandboxPort
from agent.runtime import App
from agent.sandbox import _egress
from tests.infra.daemon import to_toml


def unique_netns() -> str:
    return f"ba-test-{secrets.token_hex(4)}"


def nat_subnet() -> str:
    """A /30 of its own for each test's sandbox (10.214.0.0/16): runs beside each other (or beside
    a real daemon on 10.203.0.0/30) must not share one."""
    n = secrets.randbelow(1 << 14)
    return f"10.214.{n >> 6}.{(n & 63) * 4}/30"


def make_app(tmp: Path, **sandbox: Any) -> App:
    """An App whose config file, credential file and dirs all live under ``tmp``: the config and
    the credentials in ``tmp/etc`` (a directory of their own), state and runtime dirs beside."""
    etc = tmp / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    creds = etc / "docker-config.json"
    creds.write_text('{"auths": {"registry.example": {"auth": "c2VjcmV0OnNlY3JldA=="}}}\n')
    sections = {
        "daemon": {
            "state_dir": str(tmp / "state"),
            "runtime_dir": str(tmp / "run"),
            "socket": str(tmp / "sock" / "agent.sock"),
            "socket_group": "",
        },
        "build": {"docker_config": str(creds)},
        "sandbox": {"mode": "on", "netns": unique_netns(), "nat_subnet": nat_subnet(), **sandbox},
    }
    path = etc / "config.toml"
    path.write_text(to_toml(sections))
    for d in ("state", "run", "sock"):
        (tmp / d).mkdir(exist_ok=True)
    return App(config_mod.load(path, {}))


async def run_child(
    sandbox: SandboxPort,
    argv: list[str],
    home: Path,
    *,
    pid_namespace: bool = False,
    limit: float = 20.0,
) -> tuple[int, str]:
    """Run ``argv`` as the daemon runs its children (child.spawn: scrubbed env, own session,
    wrapped by the sandbox); return (exit code, output)."""
    child = await children.spawn(
        "test",
        argv,
        sandbox=sandbox,
        env=children.child_env(home),
        pid_namespace=pid_namespace,
    )
    try:
        assert child.stdout is not None
        out = await asyncio.wait_for(child.stdout.read(), limit)
        code = await asyncio.wait_for(child.wait(), limit)
    finally:
        if child.returncode is None:
            await child.stop(grace=0)
    return code, out.decode("utf-8", "replace")


async def poll(predicate: Callable[[], bool], limit: float = 10.0) -> bool:
    """Check ``predicate`` every 20 ms until it holds or ``limit`` seconds pass."""
    deadline = time.monotonic() + limit
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)


def mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def sh(*argv: str, check: bool = True) -> str:
    """Run a host command (ip, nft) and return its output."""
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass(frozen=True)
class HostSnapshot:
    netns: frozenset[str]
    links: frozenset[str]
    ruleset: str
    mounts: frozenset[str]
    rules: str
    ip_forward: str


def snapshot() -> HostSnapshot:
    links = frozenset(
        line.split(":")[1].strip().split("@")[0] for line in _run("ip", "-o", "link").splitlines()
    )
    mounts = frozenset(
        line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )
    return HostSnapshot(
        netns=frozenset(line.split()[0] for line in _run("ip", "netns").splitlines() if line),
        links=links,
        ruleset=_run("nft", "list", "ruleset"),
        mounts=mounts,
        rules=_run("ip", "rule"),
        ip_forward=Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
    )


def left_behind(before: HostSnapshot, after: HostSnapshot, markers: list[str]) -> list[str]:
    """What ``after`` has that ``before`` had not and that names one of ``markers`` (this test's
    namespace names, interface names, tables, directories): other test runs on the same host may
    come and go meanwhile, so only this test's own traces count. ``ip_forward`` counts when no
    sandbox of anyone's is left to need it."""
    found = [
        f"{what} {item}"
        for what, b, a in (
            ("netns", before.netns, after.netns),
            ("link", before.links, after.links),
            ("mount", before.mounts, after.mounts),
            ("rule", set(before.ruleset.splitlines()), set(after.ruleset.splitlines())),
            ("ip rule", set(before.rules.splitlines()), set(after.rules.splitlines())),
        )
        for item in sorted(set(a) - set(b))
        if any(m in item for m in markers)
    ]
    if after.ip_forward != before.ip_forward and "table inet ba_" not in after.ruleset:
        found.append(f"ip_forward {before.ip_forward} -> {after.ip_forward}")
    return found


def markers_of(app: App) -> list[str]:
    """The names a sandbox made from ``app`` gives what it creates on the host."""
    netns = app.config.sandbox.netns
    d = app.config.daemon
    return [
        netns,
        _egress.host_if_name(netns),
        _egress.table_name(netns),
        d.state_dir,
        d.runtime_dir,
    ]


def processes_matching(marker: str, *, start: bool = False) -> list[int]:
    """Live (non-zombie) pids whose command line (NULs read as spaces) contains ``marker``, or
    with ``start`` begins with it."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
        except OSError:
            continue
        text = cmd.replace(b"\0", b" ")
        found = text.startswith(marker.encode()) if start else marker.encode() in text
        if found and stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z":
            out.append(int(entry.name))
    return out


@dataclass
class InternetHost:
    """A network namespace standing in for a host on the internet: 198.18.<n>.2, reachable from
    the host over a veth pair the test made, also holding 169.254.169.254 (a metadata server
    stand-in). Traffic entering the host from ``via_if`` is policy-routed to it, so only the
    sandbox's packets go there and the host's own routes are untouched."""

    name: str
    host_if: str
    host_ip: str
    peer_ip: str
    table: int

    def exec(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


@contextlib.contextmanager
def internet_host(via_if: str) -> Any:
    n = secrets.randbelow(200) + 20
    name = f"ba-inet-{secrets.token_hex(3)}"
    host_if = f"ba-i{secrets.token_hex(4)}"
    host_ip, peer_ip = f"198.18.{n}.1", f"198.18.{n}.2"
    table = 40000 + n
    pref = 40000 + n
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name)
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "-n", name, "addr", "add", f"{peer_ip}/30", "dev", "eth0")
        _run("ip", "-n", name, "link", "set", "eth0", "up")
        _run("ip", "-n", name, "route", "add", "default", "via", host_ip)
        _run("ip", "-n", name, "addr", "add", "169.254.169.254/32", "dev", "lo")
        _run("ip", "route", "add", "default", "via", peer_ip, "dev", host_if, "table", str(table))
        _run("ip", "rule", "add", "iif", via_if, "lookup", str(table), "pref", str(pref))
        yield InternetHost(name, host_if, host_ip, peer_ip, table)
    finally:
        subprocess.run(["ip", "rule", "del", "pref", str(pref)], capture_output=True)
        subprocess.run(["ip", "route", "flush", "table", str(table)], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


CONNECT = (
    "import socket, sys\n"
    "for hp in sys.argv[1:]:\n"
    "    h, p = hp.rsplit(':', 1)\n"
    "    try:\n"
    "        s = socket.create_connection((h, int(p)), timeout=3)\n"
    "        s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
    "        print(hp, 'OK', s.recv(200).decode(errors='replace').split()[:4])\n"
    "    except OSError as e:\n"
    "        print(hp, 'FAIL', e)\n"
)


def connect_argv(*targets: str) -> list[str]:
    return [sys.executable, "-I", "-c", CONNECT, *targets]


def results(out: str) -> dict[str, str]:
    return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}


def pid1_of(pid: int) -> int:
    """The host pid of PID 1 of ``pid``'s PID namespace (buildkitd, for its RUN processes)."""
    ns = os.stat(f"/proc/{pid}/ns/pid").st_ino
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{entry.name}/status").read_text()
            nspid = next(ln for ln in status.splitlines() if ln.startswith("NSpid:")).split()
            if nspid[-1] == "1" and os.stat(f"/proc/{entry.name}/ns/pid").st_ino == ns:
                return int(entry.name)
    raise AssertionError(f"no PID 1 found for {pid}")
