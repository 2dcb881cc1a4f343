"""Ownership of builds (issue 11, attack 7): a build belongs to the uids that submitted or joined
it. Another builder sees that it exists (``ls``, few fields) but may not read its status or log
nor cancel it; ``daemon.read_uids`` may read every build but cancel none; root may do all.

Real agentctl as other uids (setpriv, as tests/test_control_auth.py), the real daemon over its
socket (0660, group nogroup), real buildah builds whose RUN step sleeps while the test acts.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.builds import build_sections, log_of, status, wait_for, write_context
from tests.infra.daemon import AGENTCTL, REPO, DaemonProcess
from tests.infra.registry import Registry

NOGROUP = 65534
OWNER, OTHER, READER = 4101, 4102, 4103

pytestmark = [
    pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah"),
    pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root"),
]


@pytest.fixture(scope="module")
def daemon(registry: Registry, base_image: str, session_tmp: Path) -> Iterator[DaemonProcess]:
    extra = {
        "daemon": {
            "socket_group": grp.getgrgid(NOGROUP).gr_name,
            "allowed_uids": [0, OWNER, OTHER],
            "read_uids": [READER],
        },
        "build": {"max_concurrent_builds": 1},
    }
    d = DaemonProcess(session_tmp / "ownership-daemon", build_sections([registry], extra))
    os.chmod(d.sock_dir, 0o755)
    d.start()
    try:
        yield d
    finally:
        d.stop()
        d.cleanup()


def ctl(d: DaemonProcess, uid: int, *args: str) -> subprocess.CompletedProcess[str]:
    """agentctl as ``uid`` (group nogroup: the socket's), or as root for uid 0."""
    prefix = (
        [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={NOGROUP}", "--clear-groups"]
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [*prefix, *AGENTCTL, "--socket", d.socket_path, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=env,
    )


def sleeper(tmp: Path, base: str) -> tuple[Path, str]:
    marker = uuid.uuid4().hex
    root = tmp / marker
    write_context(root, {"Dockerfile": f"FROM {base}\nRUN echo started-{marker} && sleep 60\n"})
    for p in (tmp, root):
        os.chmod(p, 0o755)
    os.chmod(root / "Dockerfile", 0o644)
    return root, marker


def forbidden(r: subprocess.CompletedProcess[str], rule: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "forbidden" in r.stderr and rule in r.stderr, r.stderr


def rows(d: DaemonProcess, uid: int) -> dict[str, dict[str, Any]]:
    r = ctl(d, uid, "--json", "ls")
    assert r.returncode == 0, r.stderr
    return {b["id"]: b for b in json.loads(r.stdout)["builds"]}


def test_only_owners_readers_and_root_read_and_only_owners_and_root_cancel(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    d = daemon
    ctx, marker = sleeper(short_tmp, base_image)
    target = f"{registry.host}/owned:{marker[:8]}"
    r = ctl(d, OWNER, "build", "--detach", "--context", str(ctx), "--target", target)
    assert r.returncode == 0, r.stderr
    running = r.stdout.strip()
    wait_for(lambda: f"started-{marker}" in log_of(d, running), 60, "the RUN step to start")
    queued_ctx, _ = sleeper(short_tmp, base_image)
    r = ctl(d, OWNER, "build", "--detach", "--context", str(queued_ctx), "--target", target + "q")
    assert r.returncode == 0, r.stderr
    queued = r.stdout.strip()
    try:
        # Another builder: sees that the builds exist, not what they are; reads and cancels none.
        forbidden(ctl(d, OTHER, "status", running), "only as one of them")
        forbidden(ctl(d, OTHER, "logs", running), "daemon.read_uids")
        forbidden(ctl(d, OTHER, "logs", "-f", running), "daemon.read_uids")
        # explain and diff show the key's inputs (the context's paths): the same rule.
        forbidden(ctl(d, OTHER, "explain", running), "may read its key inputs only")
        forbidden(ctl(d, OTHER, "diff", running, queued), "may read its key inputs only")
        forbidden(ctl(d, OTHER, "cancel", running), "only as one of them or as root")
        forbidden(ctl(d, OTHER, "cancel", queued), "only as one of them or as root")
        row = rows(d, OTHER)[running]
        assert row["state"] == "running" and row["mine"] is False
        assert "target_ref" not in row and "labels" not in row
        assert status(d, running)["state"] == "running"
        # The owner and a reader read everything; a reader cancels nothing.
        assert rows(d, OWNER)[running]["mine"] is True
        assert rows(d, OWNER)[running]["target_ref"] == target
        assert f"started-{marker}" in ctl(d, OWNER, "logs", running).stdout
        assert f"started-{marker}" in ctl(d, READER, "logs", running).stdout
        assert ctl(d, READER, "status", running).returncode == 0
        assert rows(d, READER)[running]["target_ref"] == target
        forbidden(ctl(d, READER, "cancel", running), "may not run 'cancel'")
        # Joining the same target makes the joiner an owner: it shares the build.
        join_ctx, _ = sleeper(short_tmp, base_image)
        r = ctl(d, OTHER, "build", "--detach", "--context", str(join_ctx), "--target", target)
        assert r.returncode == 0 and r.stdout.strip() == running, (r.stdout, r.stderr)
        assert f"started-{marker}" in ctl(d, OTHER, "logs", running).stdout
        # The owner cancels its queued build; root cancels the running one.
        assert ctl(d, OWNER, "cancel", queued).returncode == 0
        assert ctl(d, 0, "cancel", running).returncode == 0
        wait_for(lambda: status(d, running)["state"] == "cancelled", 30, "the cancel")
        assert status(d, queued)["state"] == "cancelled"
    finally:
        for build_id in (running, queued):
            ctl(d, 0, "cancel", build_id)
