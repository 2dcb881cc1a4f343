"""``sandbox.egress = "nat"``: a child reaches a stand-in internet host (a network namespace the
test makes, reachable only through the host), but not the host's own addresses nor link-local
169.254.169.254. Root; traffic stays on the namespaces this test creates."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.sandbox import Sandbox, _egress, open_sandbox
from tests.infra.registry import free_port
from tests.infra.sandbox_env import (
    InternetHost,
    connect_argv,
    internet_host,
    make_app,
    results,
    run_child,
    sh,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")

SERVE = (
    "import socket, sys\n"
    "socks = []\n"
    "for hp in sys.argv[1:]:\n"
    "    h, p = hp.rsplit(':', 1)\n"
    "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "    s.bind((h, int(p))); s.listen(); socks.append(s)\n"
    "print('ready', flush=True)\n"
    "import selectors\n"
    "sel = selectors.DefaultSelector()\n"
    "for s in socks: sel.register(s, selectors.EVENT_READ)\n"
    "while True:\n"
    "    for key, _ in sel.select():\n"
    "        c, addr = key.fileobj.accept()\n"
    "        c.sendall(b'HTTP/1.0 200 from ' + addr[0].encode() + b'\\r\\n\\r\\n'); c.close()\n"
)


def serve(prefix: list[str], *addrs: str) -> subprocess.Popen[str]:
    """A tiny TCP responder in whatever namespace ``prefix`` runs it; returns once it listens."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-I", "-c", SERVE, *addrs], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()


@pytest.fixture
async def nat_sandbox(short_tmp: Path) -> AsyncIterator[Sandbox]:
    app = make_app(short_tmp, egress="nat")
    async with open_sandbox(app) as sb:
        assert isinstance(sb, Sandbox)
        yield sb
    assert not _egress.link_exists(app.config.sandbox.netns)
    assert _egress.table_name(app.config.sandbox.netns) not in sh("nft", "list", "tables")


@pytest.fixture
def inet(nat_sandbox: Sandbox) -> Iterator[InternetHost]:
    with internet_host(_egress.host_if_name(nat_sandbox.netns)) as host:
        yield host


async def test_nat_reaches_the_internet_but_not_the_host_nor_link_local(
    nat_sandbox: Sandbox, inet: InternetHost, short_tmp: Path
) -> None:
    port, hport = free_port(), free_port()
    remote = serve(inet.exec(), f"0.0.0.0:{port}")
    local = serve([], f"0.0.0.0:{hport}")
    eth0 = sh("ip", "-4", "-o", "addr", "show", "dev", "eth0").split()[3].split("/")[0]
    assert nat_sandbox.egress is not None
    host_veth = nat_sandbox.egress.host_ip
    try:
        code, out = await run_child(
            nat_sandbox,
            connect_argv(
                f"{inet.peer_ip}:{port}",
                f"169.254.169.254:{port}",
                f"{eth0}:{hport}",
                f"{host_veth}:{hport}",
                f"{inet.host_ip}:{hport}",
                f"127.0.0.1:{hport}",
            ),
            short_tmp / "home",
        )
        # Controls: the stand-in metadata address answers inside the internet host, and the
        # host's service answers the internet host: only the sandbox is kept from them.
        proc = await asyncio.create_subprocess_exec(
            *inet.exec(*connect_argv(f"169.254.169.254:{port}", f"{inet.host_ip}:{hport}")),
            stdout=asyncio.subprocess.PIPE,
        )
        control = (await proc.communicate())[0].decode()
    finally:
        stop(remote)
        stop(local)
    assert code == 0, out
    r = results(out)
    assert r[f"{inet.peer_ip}:{port}"] == "OK", out
    # Masqueraded: the internet host sees the host's address, not the sandbox's.
    assert f"'from', '{inet.host_ip}'" in out, out
    for blocked in (
        f"169.254.169.254:{port}",
        f"{eth0}:{hport}",
        f"{host_veth}:{hport}",
        f"{inet.host_ip}:{hport}",
        f"127.0.0.1:{hport}",
    ):
        assert r[blocked] == "FAIL", out
    assert set(results(control).values()) == {"OK"}, control
