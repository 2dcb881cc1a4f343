"""The buildah toolchain's OCI runtime: found at start (or a StartupError naming the package), and a
step whose container the runtime could not create is reported as that, not as the step's own
exit status. The lines are buildah 1.28's own (a runtime failing with "cgroup mount refused")."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.build._buildah_output import diagnose
from agent.build.buildah import BuildahToolchain
from agent.errors import StartupError
from agent.sandbox import OffSandbox

pytestmark = pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")

RUNTIME_REFUSED = [
    "STEP 1/2: FROM bbase",
    "STEP 2/2: RUN true",
    "error running container: from /usr/sbin/runc creating container for [/bin/sh -c true]: "
    "cgroup mount refused",
    ": exit status 1",
    'Error: building at STEP "RUN true": while running runtime: exit status 1',
]
STEP_FAILED = [
    "STEP 1/2: FROM bbase",
    "STEP 2/2: RUN exit 3",
    'Error: building at STEP "RUN exit 3": while running runtime: exit status 3',
]


def test_a_runtime_refusal_names_the_runtimes_reason() -> None:
    err = diagnose("buildah bud", 1, RUNTIME_REFUSED, "exited with status 1")
    assert err.message.startswith("RUN true could not start its container: cgroup mount refused")
    assert "runc" in err.message
    assert err.details["step"] == "RUN true"


def test_a_failing_step_is_still_its_exit_status() -> None:
    err = diagnose("buildah bud", 1, STEP_FAILED, "exited with status 1")
    assert err.message == "RUN exit 3 failed with exit status 3"
    assert err.details["exit_code"] == 3 and err.details["tool_exit_code"] == 1


async def test_a_missing_runtime_is_a_startup_error_naming_the_package(tmp_path: Path) -> None:
    tc = BuildahToolchain(
        state_dir=tmp_path, sandbox=OffSandbox(), runtime=str(tmp_path / "no-such-runc")
    )
    with pytest.raises(StartupError, match="runc package"):
        await tc.start()
    assert tc.state == "stopped"
