"""Queue limits, cancellation, timeouts, callers leaving, and a daemon killed mid-build.

A daemon with one slot and one queue place; the builds RUN a long sleep after printing a marker,
so the tests wait for the marker in the log (not for time) before acting.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.builds import (
    build_sections,
    children_of,
    detach,
    log_of,
    start_build_daemon,
    status,
    wait_for,
    write_context,
)
from tests.infra.daemon import AGENTCTL, DaemonProcess
from tests.infra.registry import Registry

pytestmark = pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")


@pytest.fixture(scope="module")
def slow_daemon(registry: Registry, base_image: str, session_tmp: Path) -> Iterator[DaemonProcess]:
    d = start_build_daemon(
        session_tmp / "slow-daemon",
        [registry],
        {"build": {"max_concurrent_builds": 1, "max_queued": 1}},
    )
    try:
        yield d
    finally:
        d.stop()
        d.cleanup()


def sleeper(tmp: Path, base: str) -> Path:
    marker = uuid.uuid4().hex
    return write_context(
        tmp / marker,
        {"Dockerfile": f"FROM {base}\nRUN echo started-{marker} && sleep 60\n"},
    )


def wait_started(d: DaemonProcess, build_id: str) -> None:
    wait_for(lambda: "started-" in log_of(d, build_id), 30, "the RUN step to start")


def wait_state(d: DaemonProcess, build_id: str, state: str) -> dict[str, Any]:
    result: dict[str, Any] = wait_for(
        lambda: (s := status(d, build_id))["state"] == state and s, 30, f"state {state}"
    )
    return result


def no_children(d: DaemonProcess) -> None:
    wait_for(lambda: not children_of(d), 10, "every child process to be gone")


def test_queue_overflow_is_busy_and_cancel_works_queued_and_running(
    slow_daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    d = slow_daemon
    running = detach(d, sleeper(short_tmp, base_image), f"{registry.host}/q:1")
    wait_started(d, running)
    assert children_of(d), "the RUN step should be a child of the daemon"
    queued = detach(d, sleeper(short_tmp, base_image), f"{registry.host}/q:2")
    assert status(d, queued)["state"] == "queued"
    r = d.ctl(
        "build",
        "--context",
        str(sleeper(short_tmp, base_image)),
        "--target",
        f"{registry.host}/q:3",
    )
    assert r.returncode == 1 and "busy" in r.stderr and "max_queued" in r.stderr
    # joining the running build's target is not refused (dedupe needs no queue place)
    joined = detach(d, sleeper(short_tmp, base_image), f"{registry.host}/q:1")
    assert joined == running

    follower = subprocess.Popen(
        [*AGENTCTL, "--socket", d.socket_path, "logs", "-f", running],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert d.ctl("cancel", queued).returncode == 0
        assert wait_state(d, queued, "cancelled")["error"]["code"] == "cancelled"
        assert d.ctl("cancel", running).returncode == 0
        followed, _ = follower.communicate(timeout=30)  # ends with the build
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0
    assert "started-" in followed and "cancelled" in followed.splitlines()[-1]
    assert d.ctl("logs", running).stdout == followed
    assert d.ctl("status", running).returncode == 1
    listed = d.ctl("ls", "--state", "cancelled").stdout
    assert running in listed and queued in listed
    record = wait_state(d, running, "cancelled")
    assert [t["state"] for t in record["transitions"]] == ["queued", "running", "cancelled"]
    no_children(d)
    assert "started-" in log_of(d, running)


def test_timeout_mid_run(
    slow_daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    d = slow_daemon
    r = d.ctl(
        "--json",
        "build",
        "--context",
        str(sleeper(short_tmp, base_image)),
        "--target",
        f"{registry.host}/t:1",
        "--timeout",
        "3",
    )
    assert r.returncode == 1
    assert "timed_out" in r.stdout and "timeout" in r.stderr
    build_id = r.stdout.split('"id": "')[1].split('"')[0]
    assert status(d, build_id)["state"] == "timed_out"
    no_children(d)


def test_ctrl_c_cancels_unless_another_caller_waits(
    slow_daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    d = slow_daemon
    ctx = sleeper(short_tmp, base_image)
    target = f"{registry.host}/c:1"
    argv = [
        *AGENTCTL,
        "--socket",
        d.socket_path,
        "build",
        "--context",
        str(ctx),
        "--target",
        target,
    ]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with d.client() as c:
            build_id = wait_for(
                lambda: next(
                    (
                        b["id"]
                        for b in c.call("list", {"state": "running"})["builds"]
                        if b["target_ref"] == target
                    ),
                    None,
                ),
                30,
                "the build to run",
            )
        wait_started(d, build_id)
        # Both callers must be attached before the first leaves: alone, it would cancel the
        # build. The join is logged in the loop step that attaches the caller (build/handlers.py).
        wait_for(lambda: "joined this build" in log_of(d, build_id), 30, "the second caller")
        first.send_signal(signal.SIGINT)
        assert first.wait(10) == 130
        assert status(d, build_id)["state"] == "running"  # the second caller still waits
        second.send_signal(signal.SIGINT)
        assert second.wait(10) == 130
        assert "interrupted" in second.communicate()[1]
        wait_state(d, build_id, "cancelled")
        no_children(d)
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_daemon_killed_mid_build_then_restarted(
    registry: Registry, base_image: str, short_tmp: Path
) -> None:
    sections = build_sections([registry])
    d = DaemonProcess(short_tmp / "d", sections).start()
    try:
        build_id = detach(d, sleeper(short_tmp, base_image), f"{registry.host}/k:1")
        wait_started(d, build_id)
        left = children_of(d)
        assert left
        d.proc.kill()  # type: ignore[union-attr]
        d.proc.wait()  # type: ignore[union-attr]
    finally:
        d.cleanup()
    again = DaemonProcess(short_tmp / "d", sections).start()
    try:
        record = status(again, build_id)
        assert record["state"] == "interrupted"
        assert "daemon stopped" in record["error"]["message"]
        assert "started-" in log_of(again, build_id)
        # the restarted daemon killed what the dead one left running
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in left), 10, "leftovers gone")
        ctx = write_context(short_tmp / "ok", {"Dockerfile": f"FROM {base_image}\nRUN true\n"})
        r = again.ctl("build", "--context", str(ctx), "--target", f"{registry.host}/k:2")
        assert r.returncode == 0, r.stderr
    finally:
        again.stop()
        again.cleanup()


def test_sigterm_interrupts_a_build_after_the_grace_period(
    registry: Registry, base_image: str, short_tmp: Path
) -> None:
    sections = build_sections([registry], {"daemon": {"shutdown_grace": 0.5}})
    d = DaemonProcess(short_tmp / "d", sections).start()
    try:
        build_id = detach(d, sleeper(short_tmp, base_image), f"{registry.host}/term:1")
        wait_started(d, build_id)
        left = children_of(d)
        assert d.stop() == 0
        assert not any(Path(f"/proc/{p}").exists() for p in left)
    finally:
        d.cleanup()
    record = json.loads((short_tmp / "d" / "state" / "builds" / f"{build_id}.json").read_text())
    assert record["state"] == "interrupted"
    assert [t["state"] for t in record["transitions"]] == ["queued", "running", "interrupted"]
