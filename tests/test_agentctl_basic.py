"""The real agentctl process: output, --json, AGENT_SOCKET, exit codes, messages, imports."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.infra.daemon import AGENTCTL, REPO, DaemonProcess
from tests.infra.wire import recv_exact

Factory = Callable[..., DaemonProcess]


def agentctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [*AGENTCTL, *args], capture_output=True, text=True, env=full, timeout=30, cwd="/"
    )


def test_ping_and_info(daemon_factory: Factory) -> None:
    d = daemon_factory()
    r = d.ctl("ping")
    assert r.returncode == 0 and r.stdout.startswith("pong from build-agent 0.1.0")
    r = d.ctl("info")
    assert r.returncode == 0
    assert "components" in r.stdout and "sandbox     off" in r.stdout
    assert "WARNING     sandbox is OFF" in r.stdout
    # The node's per-build limits and the toolchain's store, as an operator reads them.
    assert "limits      memory_max 4GiB, pids_max 2048" in r.stdout, r.stdout
    storage = next(ln for ln in r.stdout.splitlines() if ln.startswith("storage "))
    assert " of 20 GiB" in storage and storage.split()[1].rstrip(":") in (
        "overlay",
        "vfs",
        "buildkitd",
    )


def test_json_everywhere(daemon_factory: Factory) -> None:
    d = daemon_factory()
    for args in (["--json", "ping"], ["ping", "--json"], ["info", "--json"]):
        r = d.ctl(*args)
        assert r.returncode == 0, r.stderr
        assert isinstance(json.loads(r.stdout), dict)
    info = json.loads(d.ctl("info", "--json").stdout)
    assert info["protocol"] == 1 and "ping" in info["ops"] and info["uptime"] >= 0


def test_agent_socket_env(daemon_factory: Factory) -> None:
    d = daemon_factory()
    r = agentctl("ping", env={"AGENT_SOCKET": d.socket_path})
    assert r.returncode == 0, r.stderr
    # --socket wins over the environment
    r = agentctl("--socket", d.socket_path, "ping", env={"AGENT_SOCKET": "/nonexistent.sock"})
    assert r.returncode == 0


def test_missing_socket_exit_3_with_help(short_tmp: Path) -> None:
    path = str(short_tmp / "absent.sock")
    r = agentctl("--socket", path, "ping")
    assert r.returncode == 3
    assert path in r.stderr
    assert "Is the daemon running?" in r.stderr and "systemctl status build-agent" in r.stderr
    r = agentctl("--socket", path, "--json", "ping")
    assert r.returncode == 3
    assert json.loads(r.stdout)["error"]["details"]["reason"] == "missing"


@pytest.mark.skipif(
    os.path.exists("/run/build-agent/agent.sock"), reason="a real daemon listens on this node"
)
def test_default_socket_path_is_named(short_tmp: Path) -> None:
    r = agentctl("ping")
    assert r.returncode == 3
    assert "/run/build-agent/agent.sock" in r.stderr or "permission denied" in r.stderr


def test_stale_socket_exit_3(short_tmp: Path) -> None:
    path = str(short_tmp / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # bound, never listening: connect() is refused
    try:
        r = agentctl("--socket", path, "ping")
    finally:
        s.close()
    assert r.returncode == 3 and "nothing is listening" in r.stderr


def test_usage_errors_exit_2() -> None:
    assert agentctl().returncode == 2
    r = agentctl("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert agentctl("ping", "--bogus").returncode == 2


def _fake_daemon(short_tmp: Path) -> tuple[socket.socket, str]:
    path = str(short_tmp / "fake.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(20)
    return srv, path


def _spawn(path: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*AGENTCTL, "--socket", path, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        cwd="/",
    )


def _read_request(conn: socket.socket) -> None:
    (length,) = struct.unpack(">I", recv_exact(conn, 4))
    recv_exact(conn, length)


def test_ctrl_c_exit_130(short_tmp: Path) -> None:
    srv, path = _fake_daemon(short_tmp)
    with srv:
        p = _spawn(path, "info")
        conn, _ = srv.accept()
        with conn:
            _read_request(conn)  # agentctl is now waiting for the reply
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=20)
    assert p.returncode == 130
    assert "interrupted" in err


def test_connection_dropped_mid_request_exit_3(short_tmp: Path) -> None:
    srv, path = _fake_daemon(short_tmp)
    with srv:
        p = _spawn(path, "info")
        conn, _ = srv.accept()
        _read_request(conn)
        conn.close()
        _, err = p.communicate(timeout=20)
    assert p.returncode == 3
    assert "closed the connection" in err


def test_agentctl_imports_no_daemon_dependencies(daemon_factory: Factory) -> None:
    d = daemon_factory()
    # The real console script, with every command group registered, through a full request.
    entry = [AGENTCTL[0]] if len(AGENTCTL) == 1 else ["-m", "ctl"]
    r = subprocess.run(
        [sys.executable, "-X", "importtime", *entry, "--socket", d.socket_path, "info"],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in r.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "ctl" in imported and "msgpack" in imported  # the check sees real imports
    assert not imported & {"aiohttp", "uvloop", "pyroute2", "prometheus_client", "asyncio"}


def test_daemon_sending_garbage_is_a_protocol_error(short_tmp: Path) -> None:
    srv, path = _fake_daemon(short_tmp)
    with srv:
        p = _spawn(path, "ping")
        conn, _ = srv.accept()
        with conn:
            _read_request(conn)
            conn.sendall(b"\xff\xff\xff\xffjunk")
            _, err = p.communicate(timeout=20)
    assert p.returncode == 1
    assert "protocol error" in err and "Traceback" not in err
