"""Build secrets end to end: real agentctl, the real daemon over its socket, buildah + skopeo,
docker-registry; with the sandbox off, and on when root.

Where a value may be: the caller's file, agentctl, the request frame, the daemon's memory, a
sealed memfd, buildah (which copies it into its container directory for the RUN step), the RUN
step. Where it must not be: the record, the log, the daemon's own log, any file left under the
state or runtime directory, the pushed image, an open fd of the daemon after the build.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctl.protocol import MAX_SECRET_BYTES, MAX_SECRETS
from tests.infra.builds import build_sections, image_dir, read_from_image, status, write_context
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry
from tests.infra.sandbox_env import nat_subnet, unique_netns

pytestmark = pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")

_RUN = (
    "RUN --mount=type=secret,id=tok busybox sha256sum /run/secrets/tok > /sec.txt "
    "&& cat /run/secrets/tok && echo"
)


@pytest.fixture(
    scope="module",
    params=[
        "plain",
        pytest.param(
            "sandbox",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root"),
        ),
    ],
)
def daemon(
    request: pytest.FixtureRequest, registry: Registry, base_image: str, session_tmp: Path
) -> Iterator[DaemonProcess]:
    extra: dict[str, dict[str, Any]] = {}
    if request.param == "sandbox":
        extra["sandbox"] = {"mode": "on", "netns": unique_netns(), "nat_subnet": nat_subnet()}
    d = DaemonProcess(
        session_tmp / f"secrets-{request.param}", build_sections([registry], extra)
    ).start()
    try:
        yield d
    finally:
        d.stop()
        d.cleanup()


def _files_holding(roots: list[Path], needle: bytes) -> list[str]:
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    if not os.path.isfile(path) or os.path.islink(path):
                        continue
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                if needle in data:
                    found.append(path)
    return found


def _image_holds(ref: str, needle: bytes) -> bool:
    """Every blob of ``ref`` (config and layers), decompressed, searched for ``needle``."""
    with image_dir(ref) as d:
        blobs = list(d.iterdir())
        assert len(blobs) >= 3  # manifest, config, layers
        for blob in blobs:
            data = blob.read_bytes()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            elif data[:4] == b"\x28\xb5\x2f\xfd":  # zstd: not expected from buildah here
                raise AssertionError(f"{blob.name} is zstd; cannot search it")
            if needle in data:
                return True
    return False


def test_secret_reaches_the_run_step_and_nothing_else(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    value = f"s3cr3t-{uuid.uuid4().hex}".encode()
    secret_file = short_tmp / "tok.txt"
    secret_file.write_bytes(value)
    # A unique Dockerfile: the same one with the same secret id is a cache hit whatever the value.
    unique = f"# {uuid.uuid4().hex}\n"
    ctx = write_context(short_tmp / "ctx", {"Dockerfile": f"{unique}FROM {base_image}\n{_RUN}\n"})
    repo = f"{registry.host}/sec-{uuid.uuid4().hex[:8]}"
    r = daemon.ctl(
        "--json", "build", "--context", str(ctx), "--target-repo", repo,
        "--secret", f"id=tok,src={secret_file}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + daemon.log()[-3000:]
    result = json.loads(r.stdout)
    # The RUN step read the value: its hash is in the image.
    sec = read_from_image(result["target_ref"], "/sec.txt").decode()
    assert sec.split() == [hashlib.sha256(value).hexdigest(), "/run/secrets/tok"]
    # The log shows the step's `cat` masked (a line of its own), never the value.
    assert "***" in r.stderr.splitlines()
    with daemon.client() as c:
        log = c.call("logs", {"id": result["id"]})["data"]
    assert "***" in log.splitlines()
    record = status(daemon, result["id"])
    assert record["request"]["secret_ids"] == ["tok"]
    text = value.decode()
    for where, blob in {
        "agentctl output": r.stdout + r.stderr,
        "build log": log,
        "record": json.dumps(record),
        "daemon log": daemon.log(),
    }.items():
        assert text not in blob, where
    state = [
        Path(daemon.sections["daemon"]["state_dir"]),
        Path(daemon.sections["daemon"]["runtime_dir"]),
    ]
    assert _files_holding(state, value) == []
    assert not _image_holds(result["target_ref"], value)
    assert not _image_holds(result["base_ref"], value)
    # No memfd outlives the build in the daemon.
    fds = [os.readlink(f"/proc/{daemon.pid}/fd/{n}") for n in os.listdir(f"/proc/{daemon.pid}/fd")]
    assert not [t for t in fds if "memfd:secret" in t]

    # The content key has the id, not the value: another value is a cache hit (--force rebuilds).
    secret_file.write_bytes(b"another-" + value)
    again = daemon.ctl(
        "--json", "build", "--context", str(ctx), "--target-repo", repo,
        "--secret", f"id=tok,src={secret_file}",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["cache"] == {"base": True, "workspace": True}


def test_secret_from_env_and_multiline_value_is_masked_line_by_line(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    first, second = f"line-{uuid.uuid4().hex[:12]}", f"line-{uuid.uuid4().hex[:12]}"
    unique = f"# {uuid.uuid4().hex}\n"
    ctx = write_context(short_tmp / "ctx", {"Dockerfile": f"{unique}FROM {base_image}\n{_RUN}\n"})
    r = daemon.ctl(
        "build", "--context", str(ctx), "--target", f"{registry.host}/sec-env:{first}",
        "--secret", "id=tok,env=MY_TOKEN",
        env={"MY_TOKEN": f"{first}\n{second}\n"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert first not in r.stderr and second not in r.stderr
    assert r.stderr.splitlines().count("***") >= 2  # each line of the value, masked


def _refused(d: DaemonProcess, secrets: Any) -> dict[str, Any]:
    from ctl.client import RequestFailed

    with d.client() as c, pytest.raises(RequestFailed) as err:
        c.call("build", {"target_ref": "registry.example.com/x/y:1", "secrets": secrets})
    assert err.value.code == "bad_request"
    assert err.value.details.get("field") == "secrets"
    return {"message": err.value.message}


@pytest.mark.parametrize(
    ("secrets", "words"),
    [
        ({"bad id!": "value-1"}, ["secret id (of 7 characters) is not valid", "1 to 64"]),
        ({"-x": "v"}, ["not starting with . or -"]),
        ({"a" * 65: "v"}, ["of 65 characters"]),
        ({f"s{i}": "v" for i in range(MAX_SECRETS + 1)}, [f"at most {MAX_SECRETS}"]),
        ({"big": "x" * (MAX_SECRET_BYTES + 1)}, [f"the limit is {MAX_SECRET_BYTES}"]),
        ({"n": 5}, ["value must be a string or bytes, got int"]),
        (["tok"], ["must be a map of secret id to value, got list"]),
        ("tok", ["got str"]),
    ],
)
def test_bad_secrets_are_refused_over_the_socket(
    daemon: DaemonProcess, secrets: Any, words: list[str]
) -> None:
    got = _refused(daemon, secrets)
    for word in words:
        assert word in got["message"], got
    assert "value-1" not in got["message"]
    assert daemon.ctl("ping").returncode == 0  # and the daemon goes on serving


def test_bin_values_pass_and_ref_only_builds_refuse_secrets(daemon: DaemonProcess) -> None:
    from ctl.client import RequestFailed

    with daemon.client() as c:
        # A bin value is valid: the request goes on to fail for what is really missing.
        with pytest.raises(RequestFailed) as err:
            c.call("build", {"target_ref": "r.example/x/y:1", "secrets": {"ok": b"\x00\xff"}})
        assert err.value.details.get("field") == "base_ref"
        with pytest.raises(RequestFailed) as err:
            c.call(
                "build",
                {
                    "target_ref": "r.example/x/y:1",
                    "base_ref": "r.example/b:1",
                    "secrets": {"a": "b"},
                },
            )
        assert err.value.details.get("field") == "secrets"
        assert "secrets are for Dockerfile builds" in err.value.message


def test_request_over_max_frame_names_it(daemon: DaemonProcess, short_tmp: Path) -> None:
    ctx = write_context(short_tmp / "ctx", {"Dockerfile": "FROM scratch\n"})
    flags = []
    for i in range(3):  # 3 x 400 KiB: each within the per-secret limit, together over 1 MiB
        path = short_tmp / f"s{i}"
        path.write_bytes(os.urandom(400 * 1024))
        flags += ["--secret", f"id=s{i},src={path}"]
    r = daemon.ctl("build", "--context", str(ctx), "--target", "r.example/x/y:1", *flags)
    assert r.returncode == 1, r.stderr
    assert "daemon.max_frame" in r.stderr and "Traceback" not in r.stderr
    assert "secrets travel inside it" in r.stderr
    assert daemon.ctl("ping").returncode == 0


def test_agentctl_usage_errors_exit_2(daemon: DaemonProcess, short_tmp: Path) -> None:
    ctx = write_context(short_tmp / "ctx", {"Dockerfile": "FROM scratch\n"})
    base = ["build", "--context", str(ctx), "--target", "r.example/x/y:1"]
    cases = {
        f"id=a,src={short_tmp}/missing": f"cannot read {short_tmp}/missing",
        "id=a,env=NOT_SET_HERE": "environment variable NOT_SET_HERE is not set",
        "id=NOT_SET_EITHER": "environment variable NOT_SET_EITHER is not set",
        "id=a,src=x,env=Y": "give src= or env=, not both",
    }
    for spec, message in cases.items():
        r = daemon.ctl(*base, "--secret", spec)
        assert r.returncode == 2, (spec, r.stderr)
        assert message in r.stderr
