"""SO_PEERCRED authorization with a real unprivileged client (uid 65534 via setpriv)."""

from __future__ import annotations

import grp
import os
import subprocess
from collections.abc import Callable

import pytest

from tests.infra.daemon import AGENTCTL, DaemonProcess

Factory = Callable[..., DaemonProcess]
NOBODY = 65534
NOGROUP = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")


def reachable_by_nobody(
    factory: Factory, daemon_section: dict[str, object] | None = None
) -> DaemonProcess:
    """A daemon whose socket nobody can open: group nogroup (0660) in a 0755 directory."""
    section: dict[str, object] = {"socket_group": grp.getgrgid(NOGROUP).gr_name}
    section.update(daemon_section or {})
    d = factory({"daemon": section}, start=False)
    os.chmod(d.sock_dir, 0o755)
    d.start()
    st = os.stat(d.socket_path)
    assert st.st_gid == NOGROUP and st.st_mode & 0o777 == 0o660
    return d


def test_unlisted_uid_is_forbidden(daemon_factory: Factory) -> None:
    d = reachable_by_nobody(daemon_factory)
    r = d.ctl("ping", user=NOBODY)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "forbidden" in r.stderr and "uid 65534" in r.stderr
    assert "daemon.read_uids" in r.stderr  # tells the operator which key allows it
    r = d.ctl("--json", "info", user=NOBODY)
    assert r.returncode == 1
    assert '"code": "forbidden"' in r.stdout
    assert d.ctl("ping").returncode == 0  # root is always allowed


def test_read_uid_may_read_but_not_admin(daemon_factory: Factory) -> None:
    d = reachable_by_nobody(daemon_factory, {"read_uids": [NOBODY]})
    assert d.ctl("ping", user=NOBODY).returncode == 0
    r = d.ctl("info", user=NOBODY)
    assert r.returncode == 0 and "build-agent" in r.stdout
    r = d.ctl("drain", user=NOBODY)
    assert r.returncode == 1 and "root only" in r.stderr


def test_allowed_gid_by_primary_group(daemon_factory: Factory) -> None:
    d = reachable_by_nobody(daemon_factory, {"allowed_gids": [NOGROUP]})
    assert d.ctl("ping", user=NOBODY).returncode == 0


def test_allowed_gid_by_supplementary_group(daemon_factory: Factory) -> None:
    d = reachable_by_nobody(daemon_factory, {"read_gids": [4242]})
    base = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOGROUP}"]

    def run(groups: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, f"--groups={groups}", *AGENTCTL, "--socket", d.socket_path, "ping"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
        )

    assert run("4242").returncode == 0
    assert run("4243").returncode == 1


def test_root_may_drain_and_undrain(daemon_factory: Factory) -> None:
    d = daemon_factory()
    r = d.ctl("drain")
    assert r.returncode == 0 and r.stdout.strip() == "draining"
    assert "draining" in d.ctl("info").stdout
    assert d.ctl("drain", "--off").stdout.strip() == "not draining"


def test_permission_denied_on_socket_names_the_group(daemon_factory: Factory) -> None:
    # socket_group "" keeps root's group: nobody cannot even connect.
    d = daemon_factory(start=False)
    os.chmod(d.sock_dir, 0o755)
    d.start()
    r = d.ctl("ping", user=NOBODY)
    assert r.returncode == 3
    assert "permission denied" in r.stderr
    assert "join the group 'root'" in r.stderr
