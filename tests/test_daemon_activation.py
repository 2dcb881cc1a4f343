"""Systemd socket activation with the real `systemd-socket-activate` (a real listening fd 3)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.infra.daemon import DAEMON, REPO, DaemonProcess

Factory = Callable[..., DaemonProcess]
ACTIVATE = shutil.which("systemd-socket-activate")

pytestmark = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate not installed")


def test_socket_activation(daemon_factory: Factory) -> None:
    assert ACTIVATE is not None
    d = daemon_factory(start=False)
    # The configured path must be ignored: the activated socket lives elsewhere.
    activated = os.path.join(d.sock_dir, "activated.sock")
    env = {**d.env(), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    d._notify_bind()
    # systemd-socket-activate passes only the variables named with -E (plus LISTEN_*).
    passed = ["NOTIFY_SOCKET", "PYTHONPATH", "PYTHONUNBUFFERED", "PATH"]
    cmd = [ACTIVATE, "-l", activated, *(f"-E{v}" for v in passed)]
    cmd += [*DAEMON, "run", "--config", str(d.config_path)]
    with open(d.log_path, "ab") as log:
        d.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=str(REPO))
    deadline = time.monotonic() + 10
    while not os.path.exists(activated):
        assert time.monotonic() < deadline, d.log()
        assert d.proc.poll() is None, d.log()
        time.sleep(0.01)
    # The first connection makes systemd-socket-activate exec the daemon with fd 3.
    r = d.ctl("--socket", activated, "ping", socket_arg=False)
    assert r.returncode == 0, (r.stderr, d.log())
    d.wait_notify("READY=1")
    assert "socket activation" in d.log()
    assert not os.path.exists(d.socket_path)  # the configured path was not bound
    info = d.ctl("--socket", activated, "--json", "info", socket_arg=False)
    assert info.returncode == 0
    assert d.stop(signal.SIGTERM) == 0
    # Under activation the socket belongs to systemd: the daemon must not unlink it.
    assert stat.S_ISSOCK(os.lstat(activated).st_mode)
