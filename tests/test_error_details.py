"""One error-details schema (agent.errors.BuildErrorDetails) whichever toolchain ran the build:
a failing RUN step reported by buildah and by BuildKit has the same keys, with the same values
for the step, its line and its exit status. The daemon-level checks are in test_e2e_build.py
(buildah) and test_buildkit_e2e.py (the BuildKit stand-ins)."""

from __future__ import annotations

from agent import reference
from agent.build._buildah_output import diagnose
from agent.build._buildkit_progress import build_error
from agent.build.flow import Plan, _explain
from agent.errors import AgentError, BuildErrorDetails
from tests.standins import FIXTURES_DIR

DOCKERFILE = "FROM localhost:5000/base:latest\nRUN echo about-to-fail && exit 3\n"
# What buildah 1.28 prints for that Dockerfile (its last lines).
BUILDAH = [
    "STEP 1/2: FROM localhost:5000/base:latest",
    "STEP 2/2: RUN echo about-to-fail && exit 3",
    "about-to-fail",
    'Error: building at STEP "RUN echo about-to-fail && exit 3": while running runtime: '
    "exit status 3",
]
RUN_FAILED = {"log_tail", "tool_exit_code", "reason", "step", "line", "exit_code"}


def _as_the_flow_reports(err: AgentError) -> dict[str, object]:
    plan = Plan(
        target_ref=None,
        target_repo="r/x",
        base_ref=reference.parse("r/x:k", what="base_ref"),
        dockerfile="Dockerfile",
        context_fd=None,
        dockerfile_text=DOCKERFILE,
    )
    _explain(err, plan, "localhost:5000", "localhost:1")
    return dict(err.details)


def test_a_failing_run_step_has_the_same_details_on_buildah_and_buildkit() -> None:
    lines = (FIXTURES_DIR / "build-fail-run-plain.txt").read_text().splitlines()
    buildkit = _as_the_flow_reports(
        build_error(lines[:-1], int(lines[-1].removeprefix("rc=")), tail_lines=5)
    )
    buildah = _as_the_flow_reports(diagnose("buildah bud", 1, BUILDAH, "exited with status 1"))
    assert set(buildah) == set(buildkit) == RUN_FAILED
    assert set(RUN_FAILED) <= set(BuildErrorDetails.__annotations__)
    for key in ("step", "line", "exit_code", "reason", "tool_exit_code"):
        assert buildah[key] == buildkit[key], key
    assert buildah["step"] == "RUN echo about-to-fail && exit 3"
    assert (buildah["line"], buildah["exit_code"], buildah["reason"]) == (2, 3, "run_failed")
