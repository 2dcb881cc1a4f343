"""systemd/ units: `systemd-analyze verify` clean, and the settings the daemon relies on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra.daemon import REPO

UNITS = REPO / "systemd"


def _analyze_works() -> str | None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        return "systemd-analyze is not installed"
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"systemd-analyze cannot run here: {r.stderr.strip()}"


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    why = _analyze_works()
    if why:
        pytest.skip(why)
    # The unit names /usr/bin/build-agent (a packaged install); point it at this checkout's
    # console script so verify can check that the command exists and is executable.
    exe = Path(sys.executable).parent / "build-agent"
    service = (UNITS / "build-agent.service").read_text()
    assert "ExecStart=/usr/bin/build-agent run" in service
    (tmp_path / "build-agent.service").write_text(service.replace("/usr/bin/build-agent", str(exe)))
    shutil.copy(UNITS / "build-agent.socket", tmp_path / "build-agent.socket")
    r = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            str(tmp_path / "build-agent.service"),
            str(tmp_path / "build-agent.socket"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "build-agent" not in r.stderr, r.stderr  # no warnings about our units


def _unit(name: str) -> configparser.RawConfigParser:
    p = configparser.RawConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read_string((UNITS / name).read_text())
    return p


def test_service_settings() -> None:
    s = _unit("build-agent.service")["Service"]
    assert s["Type"] == "notify"
    assert s["KillMode"] == "mixed"
    assert s["Restart"] == "on-failure"
    assert s["RuntimeDirectory"] == s["StateDirectory"] == "build-agent"
    assert int(s["WatchdogSec"]) > 0
    assert s["RestartPreventExitStatus"] == "78"
    # Settings that would break namespace creation or the toolchains must stay out.
    for forbidden in ("PrivateNetwork", "RestrictNamespaces", "SystemCallFilter", "PrivateUsers"):
        assert forbidden not in s


def test_socket_settings() -> None:
    s = _unit("build-agent.socket")["Socket"]
    assert s["ListenStream"] == "/run/build-agent/agent.sock"
    assert s["SocketMode"] == "0660"
    assert s["SocketGroup"] == "build-agent"
