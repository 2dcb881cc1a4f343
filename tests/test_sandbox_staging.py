"""Per-build staging and the daemon's code from a child's point of view (children started the way
the daemon starts them: agent/build/child.py spawn): a child sees its own build's context copy
and work directory and no other build's, and cannot write the daemon's code or environment.
This holds for the toolchain's own processes (buildah, skopeo), not only for RUN steps, which
see nothing of the node at all (tests/test_sandbox_run_isolation.py). Root; the only namespaces
are the ones these tests create."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.build import child as children
from agent.sandbox import Sandbox, _netns, code_dirs, hide_plan, open_sandbox
from tests.infra.daemon import REPO
from tests.infra.sandbox_env import make_app

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")


def _dir_with(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "f").write_text(text)
    return path


# Work directories: buildah's (bud/push/copy) and BuildKit's (buildctl, crane: their logins).
@pytest.mark.parametrize("work_root", ["buildah/tmp", "buildkit-tmp"])
@pytest.mark.parametrize("state_link", [False, True], ids=["state", "symlinked-state"])
async def test_a_child_sees_only_its_own_builds_staging_and_not_the_daemons_code_writable(
    short_tmp: Path, state_link: bool, work_root: str
) -> None:
    if state_link:  # daemon.state_dir names a symlink: children name their dirs by real paths
        (short_tmp / "real-state").mkdir()
        (short_tmp / "state").symlink_to(short_tmp / "real-state")
    app = make_app(short_tmp)
    state = Path(app.config.daemon.state_dir)
    planted = [REPO / f"planted-{uuid.uuid4().hex[:8]}", Path(sys.prefix) / "planted-by-child"]
    async with open_sandbox(app) as sb:
        assert isinstance(sb, Sandbox)
        contexts, tmp = state / "contexts", state / work_root
        mine_ctx = _dir_with(contexts / "ctx-mine", "my context")
        other_ctx = _dir_with(contexts / "ctx-other", "other context")
        mine_work = _dir_with(tmp / "bud-mine", "my login")
        other_work = _dir_with(tmp / "copy-other", "other login")
        ctx_fd = os.open(mine_ctx, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        script = "; ".join(
            [
                f"cat {mine_ctx}/f; echo",
                f"cat /dev/fd/{ctx_fd}/f; echo",
                f"cat {mine_work}/f; echo",
                f"echo written > {mine_work}/out && echo WROTE-OWN",
                f"ls -A {contexts} | tr '\\n' ' '; echo",
                f"ls -A {tmp} | tr '\\n' ' '; echo",
                f"cat {other_ctx}/f 2>/dev/null || echo OTHER-CTX-HIDDEN",
                f"cat {other_work}/f 2>/dev/null || echo OTHER-WORK-HIDDEN",
                *(f"touch {p} 2>/dev/null || echo READ-ONLY" for p in planted),
            ]
        )
        try:
            child = await children.spawn(
                "test",
                ["sh", "-c", script],
                sandbox=sb,
                env=children.child_env(short_tmp / "home"),
                pass_fds=(ctx_fd,),
                visible=(str(mine_work),),
            )
            assert child.stdout is not None
            out = (await child.stdout.read()).decode()
            code = await child.wait()
            child.close_pipe()
        finally:
            os.close(ctx_fd)
            leaked = [p for p in planted if p.exists()]
            for p in leaked:
                p.unlink()
    assert not _netns.exists(app.config.sandbox.netns)
    lines = out.splitlines()
    assert code == 0, out
    assert lines[:4] == ["my context", "my context", "my login", "WROTE-OWN"], out
    assert lines[4].split() == ["ctx-mine"], out  # the other build's directory is not there
    assert lines[5].split() == ["bud-mine"], out
    assert lines[6:8] == ["OTHER-CTX-HIDDEN", "OTHER-WORK-HIDDEN"], out
    assert lines[8:] == ["READ-ONLY", "READ-ONLY"], out
    assert leaked == []
    assert (mine_work / "out").read_text() == "written\n"  # its own work dir stays writable


def test_code_dirs_are_read_only_unless_they_hold_the_state(tmp_path: Path) -> None:
    dirs = code_dirs()
    assert any(str(REPO) == d or str(REPO).startswith(d + "/") for d in dirs), dirs
    assert any(os.path.realpath(sys.prefix).startswith(d) for d in dirs), dirs
    assert "/usr" not in dirs and "/" not in dirs
    env = {
        "AGENT_DAEMON_STATE_DIR": str(tmp_path / "code" / "state"),
        "AGENT_DAEMON_RUNTIME_DIR": str(tmp_path / "run"),
    }
    cfg = config_mod.load(None, env)
    code, other = str(tmp_path / "code"), str(tmp_path / "other")
    plan = hide_plan(cfg, code=[code, other])
    assert plan.readonly == (other,)
    assert any(code in w for w in plan.warnings), plan.warnings
    assert str(tmp_path / "code" / "state" / "contexts") in plan.private
    assert str(tmp_path / "code" / "state" / "contexts") in plan.dirs
