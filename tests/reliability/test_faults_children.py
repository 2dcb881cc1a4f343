"""Faults in the daemon's children and in the daemon itself, mid-build and mid-push.

- ``kill -9`` of each child kind while it runs: buildah (in a RUN step) and skopeo (the copy) with
  the buildah toolchain; buildctl (in a RUN step), buildkitd and crane (the copy) with the BuildKit
  stand-ins. The build ends ``failed`` with an error naming the tool and the signal; nothing of
  the killed tool's tree is left; the next build succeeds; every record parses, every log reads.
- ``kill -9`` of the daemon mid-build and mid-push, then a restart on the same state directory:
  the build is recorded ``interrupted``; what the dead daemon left running is gone; the next
  build succeeds.

A tool is caught mid-run either by its own long RUN step (a marker in the log, then ``sleep``)
or by a gate wrapper (tests/reliability/_support.py: make_gate) that holds it before it execs.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.build.child import descendants
from tests.infra.builds import build_sections, status, wait_for, write_context
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry
from tests.reliability._support import (
    Outcome,
    check_state_dir,
    cmdline,
    make_gate,
    pids_alive,
    run_build,
    standin_daemon,
    wait_log,
)

needs_buildah = pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")


def _sleeper(tmp: Path, base: str) -> tuple[Path, str]:
    marker = f"started-{uuid.uuid4().hex[:12]}"
    ctx = write_context(
        tmp / marker, {"Dockerfile": f"FROM {base}\nRUN echo {marker} && sleep 30\n"}
    )
    return ctx, marker


def _quick(tmp: Path, base: str) -> Path:
    name = uuid.uuid4().hex[:12]
    return write_context(tmp / name, {"Dockerfile": f"FROM {base}\nRUN echo quick-{name}\n"})


def _start(pool: ThreadPoolExecutor, d: DaemonProcess, ctx: Path, target: str) -> Future[Outcome]:
    return pool.submit(run_build, d.socket_path, ctx, {"target_ref": target})


def _first_build_id(d: DaemonProcess) -> str:
    def running() -> str:
        with d.client() as c:
            builds = c.call("list", {"state": "running"})["builds"]
        return str(builds[0]["id"]) if builds else ""

    build_id: str = wait_for(running, 30, "a running build")
    return build_id


def _find(d: DaemonProcess, *needles: str) -> int:
    def match() -> int:
        for pid in descendants(d.pid):
            argv = " ".join(cmdline(pid))
            if all(n in argv for n in needles):
                return pid
        return 0

    pid: int = wait_for(match, 30, f"a child matching {needles}")
    return pid


def _after(d: DaemonProcess, tmp: Path, registry: Registry, base: str) -> None:
    """The next build succeeds and the state directory is intact."""
    nxt = run_build(d.socket_path, _quick(tmp, base), {"target_ref": f"{registry.host}/next:1"})
    assert nxt.state == "succeeded", (nxt, d.log()[-3000:])
    check_state_dir(Path(d.sections["daemon"]["state_dir"]))


@needs_buildah
@pytest.mark.parametrize("victim", ["buildah", "skopeo"])
def test_kill_buildah_toolchain_child(
    victim: str, short_tmp: Path, registry: Registry, base_image: str
) -> None:
    gate = make_gate(short_tmp / "gate", "skopeo", shutil.which("skopeo") or "skopeo")
    env = {"AGENT_SKOPEO": str(gate.path)} if victim == "skopeo" else {}
    if victim == "buildah":
        gate.open()
    d = DaemonProcess(short_tmp / "d", build_sections([registry]), env=env).start()
    try:
        with ThreadPoolExecutor(1) as pool:
            if victim == "buildah":
                ctx, marker = _sleeper(short_tmp, base_image)
                fut = _start(pool, d, ctx, f"{registry.host}/kill-buildah:1")
                wait_log(d, _first_build_id(d), marker)
                pid = _find(d, "buildah", "bud")
            else:
                fut = _start(pool, d, _quick(short_tmp, base_image), f"{registry.host}/kill-sk:1")
                pid = gate.wait_started()
            tree = [pid, *descendants(pid)]
            os.kill(pid, signal.SIGKILL)
            gate.open()
            out = fut.result(timeout=60)
        assert out.code == "build_failed", out
        assert status(d, out.id)["state"] == "failed"
        assert "killed by signal 9" in out.message, out.message
        assert ("buildah bud" if victim == "buildah" else "copying the image") in out.message
        wait_for(lambda: not pids_alive(tree), 10, "the killed tool's tree to be gone")
        wait_for(lambda: not descendants(d.pid), 10, "no child left")
        _after(d, short_tmp, registry, base_image)
    finally:
        d.stop()
        d.cleanup()


@pytest.mark.parametrize("victim", ["buildctl", "buildkitd", "crane"])
def test_kill_buildkit_toolchain_child(
    victim: str, short_tmp: Path, registry: Registry, base_image: str
) -> None:
    gate = make_gate(short_tmp / "gate", "crane", str(short_tmp / "bin" / "crane"))
    env = {"AGENT_CRANE": str(gate.path)}
    if victim != "crane":
        gate.open()
    d, _ = standin_daemon(short_tmp, registry, env=env)
    try:
        with ThreadPoolExecutor(1) as pool:
            if victim == "crane":
                fut = _start(pool, d, _quick(short_tmp, base_image), f"{registry.host}/kc:1")
                pid = gate.wait_started()
            else:
                ctx, marker = _sleeper(short_tmp, base_image)
                fut = _start(pool, d, ctx, f"{registry.host}/kill-{victim}:1")
                wait_log(d, _first_build_id(d), marker)
                pid = _find(d, "buildctl.py", " build") if victim == "buildctl" else 0
                pid = pid or _find(d, "buildkitd.py")
            os.kill(pid, signal.SIGKILL)
            gate.open()
            out = fut.result(timeout=60)
        assert out.code == "build_failed", out
        assert status(d, out.id)["state"] == "failed"
        if victim != "buildkitd":
            # buildkitd's death reaches the build as buildctl's own error (the stream's EOF).
            assert victim in out.message and "signal 9" in out.message, out.message
        else:
            assert "buildkitd" in out.message or "EOF" in out.message, out.message
        _after(d, short_tmp, registry, base_image)
    finally:
        d.stop()
        d.cleanup()


@pytest.mark.parametrize("when", ["mid-build", "mid-push"])
def test_daemon_killed_then_restarted(
    when: str, short_tmp: Path, registry: Registry, base_image: str
) -> None:
    gate = make_gate(short_tmp / "gate", "crane", str(short_tmp / "bin" / "crane"))
    env = {"AGENT_CRANE": str(gate.path)}
    d, _ = standin_daemon(short_tmp, registry, env=env)
    try:
        with ThreadPoolExecutor(1) as pool:
            if when == "mid-build":
                gate.open()
                ctx, marker = _sleeper(short_tmp, base_image)
                fut = _start(pool, d, ctx, f"{registry.host}/dk:1")
                build_id = _first_build_id(d)
                wait_log(d, build_id, marker)
            else:
                fut = _start(pool, d, _quick(short_tmp, base_image), f"{registry.host}/dk:2")
                build_id = _first_build_id(d)
                gate.wait_started()
            left = descendants(d.pid)
            d.kill()
            out = fut.result(timeout=30)
        assert out.code == "unreachable" and out.state == "", out  # the connection dropped
        gate.open()
    finally:
        d.cleanup()
    sections = {k: dict(v) for k, v in d.sections.items()}
    del sections["daemon"]["socket"]  # the new helper makes its own short socket dir
    again = DaemonProcess(d.tmp, sections, env=d.extra_env).start(timeout=30)
    try:
        record = status(again, build_id)
        assert record["state"] == "interrupted", record
        assert "daemon stopped" in record["error"]["message"]
        wait_for(lambda: not pids_alive(left), 15, "what the dead daemon left running to be gone")
        _after(again, short_tmp, registry, base_image)
    finally:
        again.stop()
        again.cleanup()
