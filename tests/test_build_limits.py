"""Per-build limits (issue: a build cannot take the node down): the real daemon, real buildah,
real registry, the node's real cgroups (v1 on this project's machines, v2 where the daemon's
cgroup is delegated). A RUN step that forks past ``pids_max`` or allocates past ``memory_max``
fails with a message that names the limit, leaves nothing running, and the daemon goes on."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.build.buildkit import buildkit_binaries
from agent.limits import Limits, parse_bytes
from agent.sandbox import detect_cgroups
from tests.infra.builds import build_sections, write_context
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry
from tests.standins import install

SUPPORT = detect_cgroups(f"probe-{os.getpid()}")
for _base in SUPPORT.base:  # what the probe made, not a daemon's
    _base.rmdir()
needs_cgroups = pytest.mark.skipif(
    SUPPORT.version == 0, reason=f"no usable cgroups here: {SUPPORT.reason}"
)


def _build(d: DaemonProcess, ctx: Path, target: str, limits: dict[str, Any] | None = None) -> Any:
    """The build request over the socket (agentctl has no flag for limits yet), as a result or
    an error map."""
    import os

    from ctl.client import Client, RequestFailed

    fd = os.open(ctx, os.O_RDONLY | os.O_DIRECTORY)
    args: dict[str, Any] = {"target_ref": target}
    if limits is not None:
        args["limits"] = limits
    try:
        with Client.connect(d.socket_path, timeout=300) as c:
            return c.call("build", args, fds=[fd])
    except RequestFailed as exc:
        return {"error": {"code": exc.code, "message": exc.message, "details": exc.details}}
    finally:
        os.close(fd)


def _fork_loop(where: Path, base_image: str, count: int, sleep: str) -> Path:
    """A context whose RUN step starts ``count`` sleeps at once (``sleep`` seconds each, a
    marker that pgrep can find) and waits for them."""
    return write_context(
        where,
        {
            "Dockerfile": f"FROM {base_image}\n"
            f"RUN i=0; while [ $i -lt {count} ]; do sleep {sleep} & i=$((i+1)); done; wait\n"
        },
    )


def _pgrep(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return out.stdout.split()


REAL = buildkit_binaries()


@pytest.fixture(params=["buildah"])
def daemon(
    request: pytest.FixtureRequest, short_tmp: Path, registry: Registry, base_image: str
) -> Any:
    """A daemon whose node limits are 1 GiB and 512 processes a build, on buildah. (BuildKit's RUN
    steps run in buildkitd's own cgroups: a per-build ``cgroup-parent`` would enter every step's
    cache key; docs/builds.md.)"""
    build: dict[str, Any] = {"memory_max": "1GiB", "pids_max": 512, "toolchain": request.param}
    env = None
    if request.param == "buildkit":
        if REAL is None:
            pytest.skip("real buildkitd/buildctl/crane not installed")
        env = {"AGENT_BUILDKITD": REAL.buildkitd, "AGENT_BUILDCTL": REAL.buildctl,
               "AGENT_CRANE": REAL.crane}  # fmt: skip
    d = DaemonProcess(short_tmp / "d", build_sections([registry], {"build": build}), env=env)
    d.start(timeout=30)
    try:
        yield d
    finally:
        d.stop()
        d.cleanup()


def test_limits_parse_and_narrow() -> None:
    assert parse_bytes("512MiB") == 512 * 1024**2 and parse_bytes("2G") == 2 * 10**9
    assert parse_bytes("1048576") == 1048576
    node = Limits.from_config("4GiB", 2048, 2.0)
    assert node.narrowed({"memory_max": "1GiB", "pids_max": 100}) == Limits(1024**3, 100, 2.0)
    for bad, word in (
        ({"memory_max": "8GiB"}, "may only lower"),
        ({"pids_max": 4096}, "may only lower"),
        ({"cpu_max": 3}, "may only lower"),
        ({"pids_max": "many"}, "must be an integer"),
        ({"memory_max": "lots"}, "is not a size"),
        ({"swap": 1}, "unknown key"),
        ({"pids_max": 0}, "greater than 0"),
    ):
        with pytest.raises(Exception) as err:
            node.narrowed(bad)
        assert err.value.code == "bad_request" and word in err.value.message  # type: ignore[attr-defined]
    assert Limits.from_config("0", 0, 0) == Limits()


@needs_cgroups
def test_fork_past_pids_max_fails_with_the_pids_message(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    marker = f"7{uuid.uuid4().int % 10**6}"
    ctx = _fork_loop(short_tmp / "fork", base_image, 200, marker)
    out = _build(daemon, ctx, f"{registry.host}/limits:pids", {"pids_max": 48})
    err = out["error"]
    assert err["code"] == "build_failed", err
    assert "the build hit pids_max 48" in err["message"], err["message"]
    assert not _pgrep(f"sleep {marker}")  # nothing of the build is left running
    assert daemon.ctl("ping").returncode == 0
    with daemon.client() as c:
        record = c.call("status", {"id": err["details"]["id"]})
    assert record["state"] == "failed" and "pids_max 48" in record["error"]["message"]
    # The build's cgroup is gone; the daemon's own goes when it stops.
    from agent.build import cgroup_instance

    instance = cgroup_instance(daemon.sections["daemon"]["state_dir"])
    mine = [b.parent / instance for b in SUPPORT.base]
    assert all(d.is_dir() and not list(d.glob("2*")) for d in mine), mine
    daemon.stop()
    assert not any(d.exists() for d in mine), mine


@needs_cgroups
def test_allocation_past_memory_max_fails_with_the_memory_message(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    # busybox tail keeps the last line in memory, and /dev/zero has no newline: 400 MB held.
    ctx = write_context(
        short_tmp / "mem",
        {"Dockerfile": f"FROM {base_image}\nRUN head -c 400000000 /dev/zero | tail -n 1 >/x\n"},
    )
    out = _build(daemon, ctx, f"{registry.host}/limits:mem", {"memory_max": "96MiB"})
    err = out["error"]
    assert err["code"] == "build_failed", err
    assert "the build ran out of memory: memory_max 96 MiB" in err["message"], daemon.log()[-3000:]
    assert daemon.ctl("ping").returncode == 0


@needs_cgroups
def test_limits_are_per_build_and_a_build_within_them_succeeds(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    """A second build, with the node's limits, is not held to the first one's lower limit."""
    marker = f"8{uuid.uuid4().int % 10**6}"
    ctx = _fork_loop(short_tmp / "many", base_image, 60, f"0.{marker}")
    ok = _build(daemon, ctx, f"{registry.host}/limits:ok")
    assert ok.get("error") is None, ok
    assert ok["state"] == "succeeded"
    ctx2 = write_context(short_tmp / "many2", {**{"Dockerfile": (ctx / "Dockerfile").read_text()}})
    (ctx2 / "x").write_text("another key")
    # As a user asks for it: agentctl's flag (exit 1, the limit named in the error).
    r = daemon.ctl(
        "build", "--pids-max", "24", "--context", str(ctx2), "--target", f"{registry.host}/l:low"
    )
    assert r.returncode == 1 and "the build hit pids_max 24" in r.stderr, r.stderr


def test_a_request_above_the_node_limit_is_a_bad_request(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    ctx = write_context(short_tmp / "c", {"Dockerfile": f"FROM {base_image}\nRUN true\n"})
    out = _build(daemon, ctx, f"{registry.host}/limits:high", {"memory_max": "2GiB"})
    assert out["error"]["code"] == "bad_request"
    assert "build.memory_max" in out["error"]["message"] and "1 GiB" in out["error"]["message"]
    assert daemon.ctl("ping").returncode == 0


def test_without_cgroup_access_the_daemon_says_so_and_still_builds(
    short_tmp: Path, registry: Registry, base_image: str
) -> None:
    """A node whose cgroups the daemon cannot use: it says so at start and in ``info``, and
    builds run (unlimited). runc needs cgroups itself, so buildah's RUN steps could not run on
    such a node at all; the BuildKit stand-in runs them as plain processes."""
    # A private mount namespace with an empty tmpfs over /sys/fs/cgroup: no hierarchy to use.
    hide = ["unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs none /sys/fs/cgroup && exec "$@"', "hide-cgroups"]  # fmt: skip
    standins = install(short_tmp / "bin")
    sections = build_sections([registry], {"build": {"toolchain": "buildkit"}})
    d = DaemonProcess(short_tmp / "d", sections, env=standins.env(), argv_prefix=hide)
    d.start(timeout=30)
    try:
        assert "per-build limits are NOT applied" in d.log()
        info = json.loads(d.ctl("--json", "info").stdout)
        assert info["config"]["limits"]["cgroups"].startswith("unavailable: ")
        assert any("limits are NOT applied" in w for w in info["warnings"])
        ctx = write_context(short_tmp / "c", {"Dockerfile": f"FROM {base_image}\nRUN true\n"})
        out = _build(d, ctx, f"{registry.host}/limits:nocg", {"pids_max": 64})
        assert out.get("state") == "succeeded", out
    finally:
        d.stop()
        d.cleanup()


def test_agentctl_limit_flags_go_with_bobs_environment() -> None:
    import argparse

    from ctl.commands._buildrequest import _BUILD_FLAGS, request_args

    ns = argparse.Namespace(**dict.fromkeys(_BUILD_FLAGS), secret=None)
    ns.memory_max, ns.pids_max = "1GiB", 64
    env = {"BOB_TARGET_REF": "r.example/ws:1", "BOB_BASE_REF": "r.example/base:1"}
    args, _ = request_args(ns, env)
    assert args["target_ref"] == "r.example/ws:1" and args["base_ref"] == "r.example/base:1"
    assert args["limits"] == {"memory_max": "1GiB", "pids_max": 64}



@needs_cgroups
@pytest.mark.buildkit
def test_buildkit_run_steps_share_a_node_wide_limit(
    short_tmp: Path, registry: Registry, base_image: str
) -> None:
    """BuildKit's RUN steps run in one cgroup for all its builds (``defaultCgroupParent`` in
    buildkitd.toml), limited to the per-build limits times ``max_concurrent_builds``: a fork loop
    past it fails, naming that shared limit, and nothing of it is left running."""
    if REAL is None:
        pytest.skip("real buildkitd/buildctl/crane not installed")
    env = {"AGENT_BUILDKITD": REAL.buildkitd, "AGENT_BUILDCTL": REAL.buildctl,
           "AGENT_CRANE": REAL.crane}  # fmt: skip
    build = {"toolchain": "buildkit", "pids_max": 40, "max_concurrent_builds": 2}
    d = DaemonProcess(short_tmp / "d", build_sections([registry], {"build": build}), env=env)
    d.start(timeout=30)
    try:
        conf = (Path(d.sections["daemon"]["runtime_dir"]) / "buildkit" / "buildkitd.toml")
        assert "defaultCgroupParent" in conf.read_text()
        marker = f"9{uuid.uuid4().int % 10**6}"
        ctx = _fork_loop(short_tmp / "fork", base_image, 200, marker)
        out = _build(d, ctx, f"{registry.host}/limits:bk")
        err = out["error"]
        assert err["code"] == "build_failed", err
        assert "BuildKit's RUN steps (all builds on the node together) hit pids_max 80" in (
            err["message"]
        ), err["message"]
        assert not _pgrep(f"sleep {marker}")
        assert d.ctl("ping").returncode == 0
    finally:
        d.stop()
        d.cleanup()
