"""The sandbox in the real daemon (sandbox.mode = "on"): builds with buildah whose RUN steps try to
reach the node and other routes, and a daemon killed with SIGKILL then restarted. Root; the only
namespaces are the ones these daemons create (unique names per test)."""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.build.buildkit import buildkit_binaries
from agent.contracts import ProxyLogin
from agent.proxy._routes import mirror_name
from agent.sandbox import _egress, _netns
from tests.infra.builds import (
    build_sections,
    detach,
    log_of,
    read_from_image,
    status,
    wait_for,
    write_context,
)
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry
from tests.infra.sandbox_env import (
    left_behind,
    nat_subnet,
    pid1_of,
    processes_matching,
    sh,
    snapshot,
    unique_netns,
)
from tests.standins import VERSIONS, install

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root"),
    pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah"),
]


def sandboxed(registry: Registry, netns: str, egress: str = "none") -> dict[str, dict[str, Any]]:
    table = {"mode": "on", "netns": netns, "egress": egress, "nat_subnet": nat_subnet()}
    return build_sections([registry], {"sandbox": table})


def test_hostile_run_steps_cannot_reach_the_node_or_other_routes_and_the_push_works(
    registry: Registry, base_image: str, short_tmp: Path
) -> None:
    netns = unique_netns()
    d = DaemonProcess(short_tmp / "d", sandboxed(registry, netns)).start()
    try:
        daemon_cmdline = Path(f"/proc/{d.pid}/cmdline").read_text().replace("\0", " ")
        proxy = f"localhost:{d.sections['proxy']['port']}"
        host_proxy = d.sections["proxy"]["host_address"]
        cmdlines = "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"
        repo = f"sandboxed-{uuid.uuid4().hex[:8]}"
        guess = ProxyLogin(proxy, "build-agent", uuid.uuid4().hex).basic()
        probes = {
            # busybox-static 1.35 wget segfaults with -T: connections fail fast here anyway.
            "metrics": f"wget -q -O /dev/null http://127.0.0.1:{d.metrics_port}/metrics",
            "registry": f"wget -q -O /dev/null http://{registry.host}/v2/",
            "host-proxy": f"wget -q -O /dev/null http://{host_proxy}/v2/",
            # The proxy answers (GET /v2/ is its own: a Basic challenge) ...
            "proxy": f"wget -S -O /dev/null http://{proxy}/v2/ 2>&1 | grep -q 'HTTP/1.1 401'",
            # ... but the build's own push route is closed to the step: its name is no secret,
            # the credential is, and a guessed one fails; the upstream repository addressed
            # directly is not there at all.
            "own-route": (
                f"wget -S -O /dev/null --post-data= "
                f"http://{proxy}/v2/b/{mirror_name(registry.host)}/{repo}/blobs/uploads/ 2>&1 "
                "| grep -q '401 Unauthorized'"
            ),
            "guessed-login": (
                f"wget -S -O /dev/null --post-data= --header 'Authorization: Basic {guess}' "
                f"http://{proxy}/v2/b/{mirror_name(registry.host)}/{repo}/blobs/uploads/ 2>&1 "
                "| grep -q '401 Unauthorized'"
            ),
            "upstream-repo": (
                f"wget -S -O /dev/null --post-data= "
                f"http://{proxy}/v2/{registry.host}/stolen/blobs/uploads/ 2>&1 "
                "| grep -q '404 Not Found'"
            ),
            # The daemon's process (and its children's command lines) are out of sight, while
            # the step's own are there ("[a]" keeps the pattern from matching itself).
            "self-visible": f"{cmdlines} | grep -q -e '>> /probes'",
            "daemon-visible": f"{cmdlines} | grep -q -e '-m [a]gent run'",
        }
        script = " ; ".join(
            f'{{ {cmd} ; }} ; echo "{name} $?" >> /probes' for name, cmd in probes.items()
        )
        ctx = write_context(
            short_tmp / "ctx",
            {
                "Dockerfile": f"FROM {base_image}\nCOPY hello.txt /hello.txt\nRUN {script}\n",
                "hello.txt": "from the context",  # the context travels by fd into the sandbox
            },
        )
        target = f"{registry.host}/{repo}:1"
        r = d.ctl("build", "--context", str(ctx), "--target", target)
        assert r.returncode == 0, r.stderr + d.log()[-3000:]
        results = dict(
            line.split() for line in read_from_image(target, "/probes").decode().splitlines()
        )
        assert read_from_image(target, "/hello.txt") == b"from the context"
    finally:
        d.stop()
        d.cleanup()
    assert results["proxy"] == "0", results  # the proxy is reachable (so the others could be)
    assert results["metrics"] != "0", results
    assert results["registry"] != "0", results
    assert results["host-proxy"] != "0", results
    assert results["own-route"] == "0", results  # it got a 401
    assert results["guessed-login"] == "0", results
    assert results["upstream-repo"] == "0", results
    assert results["daemon-visible"] != "0", results
    assert results["self-visible"] == "0", results
    assert "-m agent run" in daemon_cmdline  # control: what the RUN step would have found
    assert not _netns.exists(netns)


REAL = buildkit_binaries()


def _toolchain_env(toolchain: str, tmp: Path) -> tuple[dict[str, Any], dict[str, str] | None]:
    """(the [build] keys, the daemon's environment) for buildah, a BuildKit stand-in of a recorded
    version (``standin-v0.11.6``), or the real BuildKit binaries (``real``: skipped without)."""
    if toolchain == "buildah":
        return {"toolchain": "buildah"}, None
    if toolchain == "real":
        if REAL is None:
            pytest.skip("real buildkitd/buildctl/crane not installed")
        env = {"AGENT_BUILDKITD": REAL.buildkitd, "AGENT_BUILDCTL": REAL.buildctl,
               "AGENT_CRANE": REAL.crane}  # fmt: skip
        return {"toolchain": "buildkit"}, env
    return {"toolchain": "buildkit"}, install(tmp / "bin", version=toolchain[8:]).env()


def _ancestor(pid: int, name: str) -> int:
    """The nearest ancestor of ``pid`` that runs program ``name`` (its stand-in: ``python
    .../name.py``)."""
    p, seen = pid, []
    for _ in range(64):
        p = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if p <= 1:
            break
        argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        seen.append(argv[:2])
        if any(os.path.basename(a.decode()) in (name, f"{name}.py") for a in argv[:2]):
            return p
    raise AssertionError(f"no {name} above pid {pid}: {seen}")


@pytest.mark.parametrize("toolchain", ["buildah", pytest.param("real", marks=pytest.mark.buildkit)])
def test_daemon_killed_then_restarted_recreates_the_sandbox_once_and_leaves_nothing(
    toolchain: str, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    before = snapshot()
    netns = unique_netns()
    sections = sandboxed(registry, netns, egress="nat")
    build, env = _toolchain_env(toolchain, short_tmp)
    sections["build"].update(build)
    marker = f"33{uuid.uuid4().int % 10**6}"
    ctx = write_context(
        short_tmp / "ctx",
        {"Dockerfile": f"FROM {base_image}\nRUN echo started-{marker} && sleep {marker}\n"},
    )
    d = DaemonProcess(short_tmp / "d", sections, env=env).start(timeout=30)
    try:
        old_ino = os.stat(_netns.path(netns)).st_ino
        build_id = detach(d, ctx, f"{registry.host}/killed:1")
        wait_for(lambda: f"started-{marker}" in log_of(d, build_id), 60, "the RUN step")
        wait_for(lambda: processes_matching(f"sleep {marker}", start=True), 10, "the sleep")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        # Nothing the dead daemon started outlives it, with no restart needed.
        wait_for(lambda: not processes_matching(f"sleep {marker}", start=True), 10, "RUN gone")
        assert _netns.exists(netns)  # what the next start must replace
    finally:
        d.cleanup()
    again = DaemonProcess(short_tmp / "d", sections, env=env).start(timeout=30)
    try:
        assert os.stat(_netns.path(netns)).st_ino != old_ino
        assert [ln.split()[0] for ln in sh("ip", "netns").splitlines()].count(netns) == 1
        host_if = _egress.host_if_name(netns)
        assert sh("ip", "-o", "link").count(f" {host_if}@") == 1
        assert sh("nft", "list", "tables").count(_egress.table_name(netns)) == 1
        assert "removing what an earlier daemon left" in again.log()
        assert status(again, build_id)["state"] == "interrupted"
        r = again.ctl("info")
        assert "sandbox" in r.stdout and "on" in r.stdout
    finally:
        assert again.stop() == 0
        again.cleanup()
    host_if = _egress.host_if_name(netns)
    markers = [netns, host_if, _egress.table_name(netns), str(short_tmp)]
    assert left_behind(before, snapshot(), markers) == []


@pytest.mark.parametrize(
    "toolchain",
    [*(f"standin-{v}" for v in VERSIONS), pytest.param("real", marks=pytest.mark.buildkit)],
)
def test_sigkilled_buildkitd_takes_its_run_steps_along_and_is_restarted(
    toolchain: str, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    """buildkitd (the stand-in runs a RUN step's ``sleep`` as its own child, the real one under
    runc in a session of its own: an orphan either way when it is killed unsandboxed) is PID 1 of
    its namespace: SIGKILL it mid-build and nothing of its tree is left, not even a zombie, nor a
    mount under its root; the supervisor starts a new one."""
    build, env = _toolchain_env(toolchain, short_tmp)
    netns = unique_netns()
    sections = build_sections(
        [registry], {"build": build, "sandbox": {"mode": "on", "netns": netns}}
    )
    marker = f"34{uuid.uuid4().int % 10**6}"
    ctx = write_context(
        short_tmp / "ctx", {"Dockerfile": f"FROM {base_image}\nRUN echo start && sleep {marker}\n"}
    )
    d = DaemonProcess(short_tmp / "d", sections, env=env).start(timeout=30)
    try:
        pidfile = Path(d.sections["daemon"]["runtime_dir"]) / "buildkit" / "buildkitd.pid"
        root = str(Path(d.sections["daemon"]["state_dir"]) / "buildkit")
        first = pidfile.read_text().strip()
        build_id = detach(d, ctx, f"{registry.host}/bk-killed:1")
        (step,) = wait_for(lambda: processes_matching(f"sleep {marker}", start=True), 30, "RUN")
        buildkitd = _ancestor(step, "buildkitd")
        assert pid1_of(buildkitd) == buildkitd  # PID 1 of the namespace the sandbox made
        os.kill(buildkitd, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{step}").exists(), 10, "the RUN step gone")
        wait_for(lambda: status(d, build_id)["state"] == "failed", 30, "the build failed")
        again = wait_for(
            lambda: (p := pidfile.read_text().strip() if pidfile.exists() else "") != first and p,
            30,
            "a new buildkitd",
        )
        assert Path(f"/proc/{again}").exists()
        assert not any(
            line.split()[4].startswith(root)
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
        )
    finally:
        d.stop()
        d.cleanup()
    assert not _netns.exists(netns)
