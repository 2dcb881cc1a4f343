"""A hostile buildah RUN step against the real daemon (sandbox on, real buildah): the classic
double-chroot escape (tests/fixtures/attacks/escape.c, built static here and COPY'd into the
build), then what an escaped step would do: read and write files on the node, read the docker
config, open the daemon's code for writing, poison the shared layer store, and read a
concurrent build's context copy, secret and push login. Each attempt must fail. Root; the only
namespaces are the ones these daemons create."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.builds import (
    build_sections,
    detach,
    log_of,
    read_from_image,
    status,
    wait_for,
    write_context,
)
from tests.infra.daemon import REPO, DaemonProcess
from tests.infra.registry import Registry
from tests.infra.sandbox_env import processes_matching, unique_netns

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root"),
    pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (dev/install.sh)"),
]

ESCAPE_C = Path(__file__).parent / "fixtures" / "attacks" / "escape.c"
CODE_FILE = REPO / "agent" / "sandbox" / "_exec.py"


@pytest.fixture(scope="module")
def escape_binary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bytes]:
    out = tmp_path_factory.mktemp("escape") / "escape"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(ESCAPE_C)], check=True)
    yield out.read_bytes()


def _daemon(registry: Registry, tmp: Path) -> DaemonProcess:
    creds = tmp / "creds"
    creds.mkdir()
    config = creds / "docker-config.json"
    config.write_text('{"auths": {"registry.example": {"auth": "dXNlcjpzM2NyM3Q="}}}\n')
    sections = build_sections(
        [registry],
        {
            "sandbox": {"mode": "on", "netns": unique_netns()},
            "build": {"docker_config": str(config), "max_concurrent_builds": 2},
        },
    )
    return DaemonProcess(tmp / "d", sections).start()


def _hostile_context(
    root: Path, base_image: str, binary: bytes, args: list[str], marker: str
) -> Path:
    quoted = " ".join(f"'{a}'" for a in args)
    ctx = write_context(
        root,
        {
            "Dockerfile": (
                f"FROM {base_image}\nCOPY escape /escape\n"
                f"RUN /escape {quoted} > /probes 2>&1; cat /probes; echo {marker}\n"
            ),
            "escape": binary,
        },
    )
    (ctx / "escape").chmod(0o755)
    return ctx


def _verdicts(target: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in read_from_image(target, "/probes").decode().splitlines():
        what, _, rest = line.partition(" ")
        out[what] = rest
    return out


def test_double_chroot_escape_reaches_nothing_of_the_node_and_cannot_poison_the_store(
    registry: Registry, base_image: str, short_tmp: Path, escape_binary: bytes
) -> None:
    d = _daemon(registry, short_tmp)
    secret = uuid.uuid4().hex
    read_marker = short_tmp / "node-secret"
    read_marker.write_text(secret)
    write_marker = short_tmp / "written-by-a-run-step"
    poison = f"poison-{uuid.uuid4().hex[:8]}"
    state = d.sections["daemon"]["state_dir"]
    code_before = CODE_FILE.stat()
    try:
        ctx = _hostile_context(
            short_tmp / "ctx",
            base_image,
            escape_binary,
            [
                state,
                str(read_marker),
                str(write_marker),
                d.sections["build"]["docker_config"],
                str(CODE_FILE),
                "none",
                poison,
                "0",
            ],
            "hostile-done",
        )
        target = f"{registry.host}/escape-{uuid.uuid4().hex[:8]}:1"
        r = d.ctl("build", "--context", str(ctx), "--target", target)
        assert r.returncode == 0, r.stderr + d.log()[-3000:]
        v = _verdicts(target)
        # A later build FROM the same base image, on the same layer store.
        later = write_context(
            short_tmp / "later",
            {
                "Dockerfile": (
                    f"FROM {base_image}\n"
                    f"RUN if test -e /{poison}; then echo poisoned; else echo clean; fi > /seen\n"
                )
            },
        )
        later_target = f"{registry.host}/after-escape-{uuid.uuid4().hex[:8]}:1"
        r = d.ctl("build", "--context", str(later), "--target", later_target)
        assert r.returncode == 0, r.stderr + d.log()[-3000:]
        seen = read_from_image(later_target, "/seen").decode().strip()
    finally:
        d.stop()
        d.cleanup()
    # The step holds CAP_SYS_CHROOT (the escape was really tried) and still gets nowhere.
    assert v["chroot"] == "ok", v
    assert v["fd-escape"].startswith("fail"), v
    assert v["read-marker"].startswith("fail"), v
    assert v["write-marker"].startswith("fail"), v
    assert not write_marker.exists()
    assert v["read-config"].startswith("fail"), v
    assert v["write-code"].startswith("fail"), v
    assert CODE_FILE.stat().st_mtime == code_before.st_mtime
    assert v["see-state"].startswith("fail"), v
    assert v["write-store"].startswith("fail"), v
    assert seen == "clean"


def test_run_step_cannot_read_a_concurrent_builds_context_secret_or_login(
    registry: Registry, base_image: str, short_tmp: Path, escape_binary: bytes
) -> None:
    d = _daemon(registry, short_tmp)
    peer_marker = f"peer-{uuid.uuid4().hex[:8]}"
    running = f"peer-running-{uuid.uuid4().hex[:8]}"
    secret_file = short_tmp / "peer-secret"
    secret_file.write_text(uuid.uuid4().hex)
    state = d.sections["daemon"]["state_dir"]
    peer: dict[str, Any] = {}
    try:
        peer_ctx = write_context(
            short_tmp / "peer",
            {
                "Dockerfile": (
                    f"FROM {base_image}\nCOPY {peer_marker} /m\n"
                    "RUN --mount=type=secret,id=tok cat /run/secrets/tok > /dev/null "
                    f"&& echo {running} && sleep 25\n"
                ),
                peer_marker: "the peer's context",
            },
        )
        peer_id = detach(
            d,
            peer_ctx,
            f"{registry.host}/peer-{uuid.uuid4().hex[:8]}:1",
            "--secret",
            f"id=tok,src={secret_file}",
        )
        wait_for(lambda: running in log_of(d, peer_id), 60, "the peer's RUN step")
        ctx = _hostile_context(
            short_tmp / "ctx",
            base_image,
            escape_binary,
            [state, "/nonexistent", "/nonexistent/x", "/nonexistent", "/nonexistent",
             peer_marker, "unused", "40"],
            "hostile-done",
        )  # fmt: skip
        target = f"{registry.host}/snoop-{uuid.uuid4().hex[:8]}:1"
        r = d.ctl("build", "--context", str(ctx), "--target", target)
        assert r.returncode == 0, r.stderr + d.log()[-3000:]
        peer_after = status(d, peer_id)["state"]
        v = _verdicts(target)
        peer = wait_for(
            lambda: (s := status(d, peer_id))["state"] not in ("queued", "running") and s,
            60,
            "the peer build's end",
        )
    finally:
        d.stop()
        d.cleanup()
    assert peer["state"] == "succeeded", peer
    assert v["chroot"] == "ok", v
    assert v["read-peer-context"].startswith("fail"), v
    assert v["read-peer-secret"].startswith("fail"), v
    assert v["read-peer-login"].startswith("fail"), v
    # Control: the peer was mid-build all along (on the old code the snooping step waited for
    # the peer's push to read its login, and failed above).
    assert peer_after == "running", peer_after


def _cgroup_of(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return Path("/sys/fs/cgroup/pids") / path.lstrip("/")
    raise AssertionError(f"pid {pid} has no pids cgroup")


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_cancelled_run_step_leaves_no_process_cgroup_or_runtime_state(
    registry: Registry, base_image: str, short_tmp: Path, mode: str
) -> None:
    """The step runs in a container of its own (its own cgroup, a runc state under the build's
    work directory); cancelling the build mid-step kills it and deletes both, sandbox on or off."""
    sandbox = {"mode": mode, "netns": unique_netns()} if mode == "on" else {"mode": "off"}
    d = DaemonProcess(short_tmp / "d", build_sections([registry], {"sandbox": sandbox})).start()
    marker = f"35{uuid.uuid4().int % 10**6}"
    try:
        ctx = write_context(
            short_tmp / "ctx",
            {"Dockerfile": f"FROM {base_image}\nRUN echo started-{marker} && sleep {marker}\n"},
        )
        build_id = detach(d, ctx, f"{registry.host}/cancelled-{marker}:1")
        wait_for(lambda: f"started-{marker}" in log_of(d, build_id), 60, "the RUN step")
        (step,) = wait_for(lambda: processes_matching(f"sleep {marker}", start=True), 10, "sleep")
        cgroup = _cgroup_of(step)
        # A container's cgroup, not the daemon's: buildah's own, or (given the build's run leaf
        # as --cgroup-parent, agent/sandbox/_cgroup.py) that leaf, below the build's limits.
        assert "buildah" in cgroup.name or (cgroup.name == "run" and "build-agent" in cgroup.parts)
        work = Path(d.sections["daemon"]["state_dir"]) / "buildah" / "tmp"
        (state,) = [p for p in work.glob("bud-*/runc/*") if p.is_dir()]
        r = d.ctl("cancel", build_id)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: status(d, build_id)["state"] == "cancelled", 30, "cancelled")
        wait_for(lambda: not processes_matching(f"sleep {marker}", start=True), 10, "step gone")
        wait_for(lambda: not cgroup.exists(), 10, "the step's cgroup removed")
        wait_for(lambda: not state.exists(), 10, "the runtime's state removed")
    finally:
        d.stop()
        d.cleanup()


def test_a_cache_mount_is_not_shared_with_a_later_build(
    registry: Registry, base_image: str, short_tmp: Path
) -> None:
    """``RUN --mount=type=cache`` is writable by the step: shared between builds it would carry
    one build's planted file into another's RUN step. Each build gets its own. (A bind mount of
    the build's own context still works.)"""
    sandbox = {"mode": "on", "netns": unique_netns()}
    d = DaemonProcess(short_tmp / "d", build_sections([registry], {"sandbox": sandbox})).start()
    planted = uuid.uuid4().hex
    try:
        first = write_context(
            short_tmp / "first",
            {
                "Dockerfile": (
                    f"FROM {base_image}\n"
                    f"RUN --mount=type=cache,target=/cache echo {planted} > /cache/planted\n"
                )
            },
        )
        r = d.ctl("build", "--context", str(first), "--target", f"{registry.host}/plant:1")
        assert r.returncode == 0, r.stderr + d.log()[-3000:]
        second = write_context(
            short_tmp / "second",
            {
                "Dockerfile": (
                    f"FROM {base_image}\nRUN --mount=type=cache,target=/cache "
                    "cat /cache/planted > /seen 2>/dev/null; echo end >> /seen\n"
                    # Its own context is there to bind (the staging of its build is visible).
                    "RUN --mount=type=bind,target=/ctx cat /ctx/hello >> /seen\n"
                ),
                "hello": "own context\n",
            },
        )
        target = f"{registry.host}/victim:1"
        r = d.ctl("build", "--context", str(second), "--target", target)
        assert r.returncode == 0, r.stderr + d.log()[-3000:]
        seen = read_from_image(target, "/seen").decode()
    finally:
        d.stop()
        d.cleanup()
    assert planted not in seen, seen
    assert seen == "end\nown context\n"


def test_a_daemon_killed_mid_step_with_the_sandbox_off_leaves_nothing_after_restart(
    registry: Registry, base_image: str, short_tmp: Path
) -> None:
    """Without the sandbox's PID namespace a SIGKILLed daemon's buildah and its container go on
    running; the next start kills them and deletes the container's cgroup and runc state."""
    sections = build_sections([registry], {"sandbox": {"mode": "off"}})
    marker = f"36{uuid.uuid4().int % 10**6}"
    ctx = write_context(
        short_tmp / "ctx",
        {"Dockerfile": f"FROM {base_image}\nRUN echo started-{marker} && sleep {marker}\n"},
    )
    d = DaemonProcess(short_tmp / "d", sections).start()
    try:
        build_id = detach(d, ctx, f"{registry.host}/killed-off-{marker}:1")
        wait_for(lambda: f"started-{marker}" in log_of(d, build_id), 60, "the RUN step")
        (step,) = wait_for(lambda: processes_matching(f"sleep {marker}", start=True), 10, "sleep")
        cgroup = _cgroup_of(step)
        work = Path(d.sections["daemon"]["state_dir"]) / "buildah" / "tmp"
        (state,) = [p for p in work.glob("bud-*/runc/*") if p.is_dir()]
        d.kill()
    finally:
        d.cleanup()
    assert processes_matching(f"sleep {marker}", start=True) == [step]  # still running
    again = DaemonProcess(short_tmp / "d", sections).start()
    try:
        assert not processes_matching(f"sleep {marker}", start=True)
        assert not cgroup.exists()
        assert not state.exists()
        assert status(again, build_id)["state"] == "interrupted"
    finally:
        again.stop()
        again.cleanup()
