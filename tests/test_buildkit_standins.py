"""The stand-ins stay honest: where a recording's situation can be reproduced here, the stand-in
prints exactly what the real tool printed (fixtures/toolchain), and it refuses what the real CLI
refuses."""

from __future__ import annotations

import http.server
import os
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.standins import FIXTURES_DIR, VERSIONS, Standins, install


@pytest.fixture(params=VERSIONS)
def standins(request: pytest.FixtureRequest, short_tmp: Path) -> Standins:
    return install(short_tmp / "bin", version=request.param)


# As when the recordings were made (tests/fixtures/toolchain/README.md).
_RECORDED_CONFIG = """
[registry."localhost:5000"]
  http = true
  insecure = true
[registry."127.0.0.1:5000"]
  http = true
  insecure = true
"""


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True  # a connection of an earlier run may linger in TIME_WAIT
    daemon_threads = True


class _NoSuchImage(http.server.BaseHTTPRequestHandler):
    """A registry that has no image: 404 to everything."""

    def do_HEAD(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def empty_registry_5000() -> Iterator[None]:
    """Something on localhost:5000 answering 404, as the recording's registry did for an image
    it did not have (the recorded text names the port)."""
    try:
        srv = _Server(("127.0.0.1", 5000), _NoSuchImage)
    except OSError as exc:
        pytest.skip(f"127.0.0.1:5000 is taken ({exc}); the recording names that port")
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


@pytest.fixture
def buildkitd(standins: Standins, short_tmp: Path) -> Iterator[str]:
    sock = short_tmp / "bk.sock"
    (short_tmp / "bk.toml").write_text(_RECORDED_CONFIG)
    proc = subprocess.Popen(
        [standins.path("buildkitd"), "--config", str(short_tmp / "bk.toml"),
         "--root", str(short_tmp / "root"), "--addr", f"unix://{sock}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:  # the startup log ends with "running server on <sock>"
        if b"running server on" in line:
            break
    try:
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def _fixture(name: str, version: str) -> str:
    own = FIXTURES_DIR / version / name
    return (own if version != VERSIONS[0] and own.exists() else FIXTURES_DIR / name).read_text()


def _recorded(name: str, version: str) -> tuple[str, int]:
    lines = _fixture(name, version).splitlines()
    return "\n".join(lines[:-1]) + "\n", int(lines[-1].removeprefix("rc="))


def _run(argv: list[str], **kw: object) -> tuple[str, int]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]
    return done.stdout + done.stderr, done.returncode


@pytest.mark.parametrize("case", ["fail-syntax", "fail-base"])
def test_buildctl_build_replays_the_recording(
    case: str, standins: Standins, buildkitd: str, short_tmp: Path, request: pytest.FixtureRequest
) -> None:
    # Both situations are reproducible here: an unknown instruction, and FROM an image that the
    # registry on localhost:5000 does not have (v0.11.6 then tries HTTPS and reports that).
    if case == "fail-base":
        request.getfixturevalue("empty_registry_5000")
    fd = os.open(FIXTURES_DIR / "contexts" / case, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out, rc = _run(
            [standins.path("buildctl"), "--addr", buildkitd, "build", "--frontend",
             "dockerfile.v0", "--local", f"context=/dev/fd/{fd}", "--local",
             f"dockerfile=/dev/fd/{fd}", "--opt", "filename=Dockerfile", "--progress=plain",
             "--output", "type=image,name=localhost:5000/fixture-ok:plain,push=true",
             "--metadata-file", str(short_tmp / "m.json")],
            pass_fds=(fd,),
        )  # fmt: skip
    finally:
        os.close(fd)
    assert (out, rc) == _recorded(f"build-{case}-plain.txt", standins.version)


def test_buildctl_unreachable_and_refused_flags(standins: Standins) -> None:
    out, rc = _run(
        [standins.path("buildctl"), "--addr", "unix:///run/buildkit/missing.sock", "debug",
         "workers"]
    )  # fmt: skip
    assert (out, rc) == _recorded("buildctl-daemon-unreachable.txt", standins.version)
    out, rc = _run([standins.path("buildctl"), "--bogus", "debug", "workers"])
    assert rc == 1 and "flag provided but not defined: -bogus" in out
    if standins.version == "v0.11.6":
        out, rc = _run([standins.path("buildctl"), "build", "--progress=rawjson"])
        assert rc == 1 and "invalid progress mode rawjson" in out
    out, rc = _run([standins.path("buildkitd"), "--no-such-flag"])
    assert rc == 1 and "flag provided but not defined: -no-such-flag" in out


def test_workers_both_formats(standins: Standins, buildkitd: str) -> None:
    out, rc = _run([standins.path("buildctl"), "--addr", buildkitd, "debug", "workers"])
    assert (out, rc) == (_fixture("workers.txt", standins.version), 0)
    out, rc = _run(
        [standins.path("buildctl"), "--addr", buildkitd, "debug", "workers", "--format",
         "{{json .}}"]
    )  # fmt: skip
    assert out == _fixture("workers.json", standins.version).strip() + "\n"


def test_crane_help_and_flags(standins: Standins) -> None:
    out, rc = _run([standins.path("crane"), "copy", "--help"])
    assert rc == 0 and out == (FIXTURES_DIR / "crane-copy-help.txt").read_text() + "\n"
    out, rc = _run([standins.path("crane"), "copy", "a", "b", "--bogus"])
    assert rc == 1 and out == "Error: unknown flag: --bogus\n"
    calls = [c["argv"] for c in standins.calls("crane")]
    assert calls == [["copy", "--help"], ["copy", "a", "b", "--bogus"]]
