"""Errors read from what the real buildctl and crane printed (fixtures/toolchain), unchanged."""

from __future__ import annotations

import pytest

from agent.build._buildkit_progress import build_error, copied_digest, copy_error
from agent.errors import (
    AgentError,
    BuildFailed,
    InternalError,
    NotFound,
    UpstreamUnauthorized,
)
from tests.standins import FIXTURES_DIR


def recorded(name: str, version: str = "v0.11.6") -> tuple[list[str], int]:
    own = FIXTURES_DIR / version / name
    lines = (own if own.exists() else FIXTURES_DIR / name).read_text().splitlines()
    return lines[:-1], int(lines[-1].removeprefix("rc="))


CASES: dict[str, tuple[type[AgentError], str, list[str]]] = {
    "build-fail-run-plain.txt": (
        BuildFailed,
        "Dockerfile:2: RUN echo about-to-fail && exit 3 failed: the command exited with status 3",
        [" > [2/2] RUN echo about-to-fail && exit 3:", "#0 0.089 about-to-fail"],
    ),
    "build-fail-syntax-plain.txt": (
        BuildFailed,
        "Dockerfile:2: syntax error: unknown instruction: RUNN (did you mean RUN?): RUNN echo typo",
        ["#2 DONE 0.0s"],
    ),
    "build-fail-base-plain.txt": (
        BuildFailed,
        "Dockerfile:1: the base image localhost:5000/does-not-exist:latest could not be pulled: "
        'failed to do request: Head "https://localhost:5000/v2/does-not-exist/manifests/latest"',
        [" > [internal] load metadata for localhost:5000/does-not-exist:latest:"],
    ),
    "build-push-unauthorized-plain.txt": (
        UpstreamUnauthorized,
        "the registry localhost:5001 refused the push of localhost:5001/fixture:unauth: "
        "unexpected status: 401 Unauthorized",
        [],
    ),
    "build-daemon-killed-plain.txt": (
        BuildFailed,
        "buildkitd stopped during the build (killed or crashed); the daemon restarts it",
        ["#5 0.120 start"],
    ),
    "buildctl-daemon-unreachable.txt": (
        InternalError,
        "buildctl could not reach buildkitd (transport: error while dialing: dial unix "
        "/run/buildkit/missing.sock: connect: no such file or directory)",
        [],
    ),
}


# What BuildKit v0.24.0 printed in the same situations (tests/fixtures/toolchain/v0.24.0): the
# vertices come in another order, a RUN step's lines lose their "#N" in the error box, a missing
# base image is "not found" (no HTTPS retry), a refused push names the request.
CASES_V024: dict[str, tuple[type[AgentError], str, list[str]]] = {
    "build-fail-run-plain.txt": (
        BuildFailed,
        "Dockerfile:2: RUN echo about-to-fail && exit 3 failed: the command exited with status 3",
        [" > [2/2] RUN echo about-to-fail && exit 3:", "0.058 about-to-fail"],
    ),
    "build-fail-syntax-plain.txt": (*CASES["build-fail-syntax-plain.txt"][:2], ["#1 DONE 0.0s"]),
    "build-fail-base-plain.txt": (
        BuildFailed,
        "Dockerfile:1: the base image localhost:5000/does-not-exist:latest could not be pulled: "
        "failed to resolve source metadata for localhost:5000/does-not-exist:latest: "
        "localhost:5000/does-not-exist:latest: not found",
        ["#2 ERROR: localhost:5000/does-not-exist:latest: not found"],
    ),
    "build-push-unauthorized-plain.txt": (
        UpstreamUnauthorized,
        "the registry localhost:5001 refused the push of localhost:5001/fixture-ok:auth: "
        "unexpected status from HEAD request to http://localhost:5001/v2/fixture-ok/blobs/",
        [],
    ),
    "build-daemon-killed-plain.txt": (
        *CASES["build-daemon-killed-plain.txt"][:2],
        ["#5 0.066 start"],
    ),
    "buildctl-daemon-unreachable.txt": (
        InternalError,
        "buildctl could not reach buildkitd (transport: Error while dialing: dial unix "
        "/run/buildkit/missing.sock: connect: no such file or directory)",
        [],
    ),
}


@pytest.mark.parametrize(
    ("version", "name"),
    [("v0.11.6", n) for n in sorted(CASES)] + [("v0.24.0", n) for n in sorted(CASES_V024)],
)
def test_recorded_failure_becomes_an_actionable_error(version: str, name: str) -> None:
    cls, start, tail = (CASES if version == "v0.11.6" else CASES_V024)[name]
    lines, rc = recorded(name, version)
    err = build_error(lines, rc, tail_lines=5)
    assert type(err) is cls
    assert err.message.startswith(start), err.message
    for line in tail:
        assert line in err.details["log_tail"]
    assert len(err.details["log_tail"]) <= 5


def test_scrub_applies_to_messages_and_tails() -> None:
    lines, rc = recorded("build-push-unauthorized-plain.txt")
    lines = [
        ln.replace("localhost:5001/fixture", "localhost:5001/b/cap-SECRET/fixture") for ln in lines
    ]
    err = build_error(lines, rc, tail_lines=20, scrub=lambda s: s.replace("cap-SECRET", "***"))
    assert "cap-SECRET" not in err.message + repr(err.details)
    assert "localhost:5001/b/***/fixture:unauth" in err.message
    # The refusal's own words may name the route too (a token scope): scrubbed as well.
    lines[-1] += " (scope repository:b/cap-SECRET/fixture:push)"
    err = build_error(lines, rc, tail_lines=20, scrub=lambda s: s.replace("cap-SECRET", "***"))
    assert "cap-SECRET" not in err.message + repr(err.details)
    assert "repository:b/***/fixture:push" in err.message


def test_recorded_crane_outputs() -> None:
    ok, _ = recorded("crane-copy-ok.txt")
    assert copied_digest(ok) == (FIXTURES_DIR / "crane-digest-ok.txt").read_text().split()[0]
    again, _ = recorded("crane-copy-existing.txt")  # a repeated copy names the digest otherwise
    assert copied_digest(again) == (
        "sha256:42665d22767fb9848ffff8bd47aaed855d2cd6970d73858a89b0024b99df2609"
    )
    lines, rc = recorded("crane-copy-notfound.txt")
    missing = copy_error(lines, rc, "localhost:5000/nope:1", "localhost:5000/x:2", tail_lines=5)
    assert isinstance(missing, NotFound)
    assert missing.message.startswith("the image localhost:5000/nope:1 to copy does not exist")
    lines, rc = recorded("crane-copy-unauthorized.txt")
    refused = copy_error(lines, rc, "localhost:5000/a:1", "localhost:5001/fixture:1", tail_lines=5)
    assert isinstance(refused, UpstreamUnauthorized) and refused.registry == "localhost:5001"
    assert "401 Unauthorized" in refused.message


@pytest.mark.parametrize("version", ["v0.11.6", "v0.24.0"])
@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("build-fail-copy-missing-plain.txt", "missing.txt"),
        ("build-fail-copy-missing-dir-plain.txt", "sub/missing.txt"),
    ],
)
def test_a_missing_copy_source_is_named_inside_the_context(
    version: str, name: str, source: str
) -> None:
    """BuildKit names its own mount point (v0.11.6) or a rooted path; the error names the path
    inside the context, and no directory of the daemon's."""
    lines, rc = recorded(name, version)
    err = build_error(lines, rc, tail_lines=5)
    assert type(err) is BuildFailed
    first = err.message.splitlines()[0]
    assert first.startswith(f"Dockerfile:2: COPY {source} /x failed: {source} is not in the ")
    assert "/tmp/" not in first and "buildkit-mount" not in first
    assert err.details["missing_path"] in (source, source.split("/")[0])

