"""The whole flow with ``build.toolchain = "buildkit"``: the real daemon, the real proxy, real
agentctl and docker-registry, with buildkitd/buildctl/crane being the stand-ins (named by
AGENT_BUILDKITD/AGENT_BUILDCTL/AGENT_CRANE), or the real programs when they are installed.

With the stand-ins no layer is built (the pushed image is the base image, see
tests/standins/buildkitd.py), so this checks the BuildKit argv, the proxy routes and mirrors in
buildkitd.toml, the existence check and the cache, not the image's content."""

from __future__ import annotations

import base64
import json
import os
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.build.buildkit import buildkit_binaries
from tests.infra.builds import build_sections, write_context
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry
from tests.standins import VERSIONS, Standins, install

REAL = buildkit_binaries()


def _sandbox_ok() -> bool:
    return os.geteuid() == 0


# The stand-ins impersonate each recorded BuildKit generation: they ask a mirror in that
# version's URL form, so a buildkitd.toml one version misreads fails here (v0.11.6 sends a mirror
# with a path as /<path>/v2/..., which the proxy once answered with 404).
@pytest.fixture(
    params=[
        *(f"standin-{v}" for v in VERSIONS),
        *(
            pytest.param(
                f"standin-sandbox-{v}",
                marks=pytest.mark.skipif(not _sandbox_ok(), reason="the sandbox needs root"),
            )
            for v in VERSIONS
        ),
        pytest.param("real", marks=pytest.mark.buildkit),
        pytest.param(
            "real-sandbox",
            marks=[
                pytest.mark.buildkit,
                pytest.mark.skipif(not _sandbox_ok(), reason="the sandbox needs root"),
            ],
        ),
    ]
)
def daemon(
    request: pytest.FixtureRequest, short_tmp: Path, registry: Registry, base_image: str
) -> Iterator[tuple[DaemonProcess, Standins | None]]:
    standins: Standins | None = None
    extra: dict[str, Any] = {"build": {"toolchain": "buildkit"}}
    if "sandbox" in request.param:
        from tests.infra.sandbox_env import unique_netns

        # buildkitd in the sandbox: own network (the proxy is its only way out), mount and PID
        # namespace; buildctl and crane in the same network namespace.
        extra["sandbox"] = {"mode": "on", "netns": unique_netns()}
    if request.param.startswith("real"):
        if REAL is None:
            pytest.skip("real buildkitd/buildctl/crane not installed")
        env = {"AGENT_BUILDKITD": REAL.buildkitd, "AGENT_BUILDCTL": REAL.buildctl,
               "AGENT_CRANE": REAL.crane}  # fmt: skip
    else:
        standins = install(short_tmp / "bin", version=request.param.rpartition("-")[2])
        env = standins.env()
    d = DaemonProcess(short_tmp / "d", build_sections([registry], extra), env=env)
    try:
        d.start(timeout=30)
        yield d, standins
    finally:
        d.stop()
        d.cleanup()


def _build(d: DaemonProcess, *args: str) -> dict[str, Any]:
    r = d.ctl("--json", "build", *args, timeout=120)
    out = json.loads(r.stdout) if r.stdout.strip() else {}
    out["_rc"], out["_stderr"] = r.returncode, r.stderr
    return out


def test_build_and_copy_through_the_daemon_with_buildkit(
    daemon: tuple[DaemonProcess, Standins | None],
    registry: Registry,
    base_image: str,
    short_tmp: Path,
) -> None:
    d, standins = daemon
    info = json.loads(d.ctl("--json", "info").stdout)
    assert "buildkit" in json.dumps(info)
    ctx = write_context(
        short_tmp / "ctx",
        {
            "Dockerfile": f"FROM {base_image}\nCOPY hello.txt /hello.txt\n"
            "RUN echo built-$(cat /hello.txt) > /out.txt\n",
            "hello.txt": uuid.uuid4().hex,
        },
    )
    repo = f"{registry.host}/bk-{uuid.uuid4().hex[:8]}"
    first = _build(d, "--context", str(ctx), "--target-repo", repo)
    assert first["_rc"] == 0, first["_stderr"] + d.log()[-3000:]
    assert first["state"] == "succeeded"
    assert first["cache"] == {"base": False, "workspace": False}
    assert first["digest"].startswith("sha256:")
    second = _build(d, "--context", str(ctx), "--target-repo", repo)
    assert second["cache"] == {"base": True, "workspace": True}
    assert second["digest"] == first["digest"]
    run = Path(d.sections["daemon"]["runtime_dir"]) / "buildkit"
    conf = tomllib.loads((run / "buildkitd.toml").read_text())
    child = f"localhost:{d.sections['proxy']['port']}"
    assert conf["registry"][child] == {"http": True}
    assert conf["registry"][registry.host]["mirrors"] == [child]
    if standins is None:
        return
    (build,) = [c["argv"] for c in standins.calls("buildctl") if "build" in c["argv"]]
    output = build[build.index("--output") + 1]
    assert output.startswith(f"type=image,name={child}/") and output.endswith(",push=true")
    assert "--progress=plain" in build and "--metadata-file" in build
    (copy,) = [c["argv"] for c in standins.calls("crane")]
    assert copy[0] == "copy" and copy[-1] == "--insecure"
    assert all(ref.startswith(f"{child}/") for ref in copy[1:3])
    # The route's capability travels as the login of a docker config made for the one child,
    # never on an argv, and never reaches the record or the daemon's log; the file is gone after.
    for call in [*standins.calls("buildctl"), *standins.calls("crane")]:
        if "build" not in call["argv"] and call["argv"][0] != "copy":
            continue
        (entry,) = call["docker_config"]["auths"].items()
        assert entry[0] == child
        user, _, cap = base64.b64decode(entry[1]["auth"]).decode().partition(":")
        assert user == "build-agent" and len(cap) == 32
        for text in (" ".join(call["argv"]), json.dumps(first), d.log()):
            assert cap not in text and entry[1]["auth"] not in text
        assert not Path(call["docker_config_path"]).exists()


def test_failed_run_step_reports_line_and_exit_code(
    daemon: tuple[DaemonProcess, Standins | None],
    registry: Registry,
    base_image: str,
    short_tmp: Path,
) -> None:
    d, _ = daemon
    ctx = write_context(
        short_tmp / "bad",
        {"Dockerfile": f"FROM {base_image}\nRUN echo about-to-fail && exit 3\n"},
    )
    out = _build(d, "--context", str(ctx), "--target-repo", f"{registry.host}/bk-fail")
    assert out["_rc"] == 1
    text = json.dumps(out)
    assert "build_failed" in text
    assert "Dockerfile:2" in text and "exited with status 3" in text
    # The keys buildah's are too (test_e2e_build.py, test_error_details.py).
    details = out["error"]["details"]
    assert set(details) == {
        "id", "log_tail", "tool_exit_code", "reason", "step", "line", "exit_code"
    }  # fmt: skip
    assert (details["line"], details["exit_code"]) == (2, 3)
