"""Build secrets below the daemon: sealed memfds, the scrub, the content key, agentctl's
``--secret`` parsing, and the argv each toolchain gets (buildah for real, BuildKit with its
stand-ins). The daemon end to end is tests/test_e2e_build_secrets.py."""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agent.build.buildah import BuildahToolchain
from agent.build.buildkit import BuildkitBinaries, BuildkitToolchain
from agent.build.buildlog import SecretScrub
from agent.build.context import hash_context
from agent.build.secretfds import sealed_memfd, secret_fds, secret_flags
from agent.build.toolchain import BuildSpec
from agent.sandbox import OffSandbox
from ctl.commands._buildrequest import _BUILD_FLAGS, UsageError, read_secrets, request_args
from ctl.protocol import MAX_SECRET_BYTES
from tests.infra.builds import read_from_image, write_context
from tests.infra.registry import Registry
from tests.standins import Standins, install
from tests.test_buildkit_toolchain import FAST, DirectPort, Sink, _dirs


def _memfds() -> list[str]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("/memfd:secret-"):
            out.append(target)
    return out


def test_memfd_holds_the_value_sealed_and_is_closed_after() -> None:
    before = _memfds()
    with secret_fds({"b": b"second", "a": b"first-value"}) as fds:
        assert [sid for sid, _ in fds] == ["a", "b"]
        (_, fd), _ = fds
        # What a child reads through /dev/fd/N: the whole value, from the start.
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            assert f.read() == b"first-value"
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        for seal in (fcntl.F_SEAL_WRITE, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_SEAL):
            assert seals & seal
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):  # nor can the seals be taken off or changed
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        with pytest.raises(OSError) as err, open(f"/proc/self/fd/{fd}", "r+b") as f:
            f.write(b"overwrite")
            f.flush()
        assert err.value.errno == errno.EPERM
        assert not os.get_inheritable(fd)  # only pass_fds hands it to a child
        assert len(_memfds()) == len(before) + 2
    assert _memfds() == before
    with pytest.raises(OSError):
        os.fstat(fd)


def test_memfds_are_closed_when_the_build_call_fails() -> None:
    before = _memfds()
    with pytest.raises(RuntimeError), secret_fds({"a": b"v" * 10}):
        raise RuntimeError("the build failed")
    assert _memfds() == before


def test_empty_and_largest_values() -> None:
    for value in (b"", b"\0\xff" * (MAX_SECRET_BYTES // 2)):
        fd = sealed_memfd("x", value)
        try:
            assert os.pread(fd, MAX_SECRET_BYTES + 1, 0) == value
        finally:
            os.close(fd)


def test_secret_flags_name_fds_only() -> None:
    assert secret_flags((("tok", 9),)) == ["--secret", "id=tok,src=/dev/fd/9"]
    # buildah would read an environment variable named like the id without type=file.
    assert secret_flags((("HOME", 9), ("b", 10)), file_type=True) == [
        "--secret", "id=HOME,src=/dev/fd/9,type=file",
        "--secret", "id=b,src=/dev/fd/10,type=file",
    ]  # fmt: skip


def test_scrub_masks_values_and_each_line_of_a_multiline_value() -> None:
    scrub = SecretScrub(
        lambda s: s.replace("cap-SECRET", "<cap>"),
        [b"hunter2-token\n", b"line-one\r\nline-two\nab\n", b"abc", "päss".encode()],
    )
    assert scrub("token=hunter2-token at cap-SECRET") == "token=*** at <cap>"
    assert scrub("got line-one and line-two") == "got *** and ***"
    # Pieces under 4 characters are left alone: masking them would mangle every line.
    assert scrub("ab abc") == "ab abc"
    assert scrub("x päss y") == "x *** y"
    scrub.forget()
    assert scrub("hunter2-token cap-SECRET") == "hunter2-token <cap>"


def test_content_key_has_secret_ids_never_values(short_tmp: Path) -> None:
    ctx = write_context(short_tmp / "ctx", {"Dockerfile": "FROM scratch\n"})
    fd = os.open(ctx, os.O_RDONLY | os.O_DIRECTORY)
    try:
        plain = hash_context(fd, "Dockerfile").key
        assert hash_context(fd, "Dockerfile", secret_ids=[]).key == plain  # unchanged keys
        one = hash_context(fd, "Dockerfile", secret_ids=["tok"]).key
        two = hash_context(fd, "Dockerfile", secret_ids=["b", "tok"]).key
        assert len({plain, one, two}) == 3
        assert hash_context(fd, "Dockerfile", secret_ids=["tok", "b"]).key == two
    finally:
        os.close(fd)


# --- agentctl --secret -----------------------------------------------------------------------


def test_agentctl_reads_file_env_and_bare_id(short_tmp: Path) -> None:
    f = short_tmp / "tok"
    f.write_bytes(b"from-file\n")
    env = {"VAR": "from-env", "npm": "bare"}
    got = read_secrets(
        [f"id=a,src={f}", "id=b,env=VAR", "id=npm", f"id=c,type=file,source={f}",
         "id=d,type=env,src=VAR"],
        env,
    )  # fmt: skip
    assert got == {
        "a": b"from-file\n", "b": b"from-env", "npm": b"bare", "c": b"from-file\n",
        "d": b"from-env",
    }  # fmt: skip
    ns = argparse.Namespace(**dict.fromkeys(_BUILD_FLAGS))  # every build flag unset ...
    ns.target, ns.secret = "r.example/x:1", [f"id=a,src={f}"]  # ... but these
    args, _ = request_args(ns, env)
    assert args["secrets"] == {"a": b"from-file\n"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("id=a,src={missing}", "cannot read {missing}: No such file or directory"),
        ("id=a,src={dir}", "cannot read {dir}: Is a directory"),
        ("id=a,env=UNSET_VAR", "environment variable UNSET_VAR is not set"),
        ("id=UNSET_TOO", "environment variable UNSET_TOO is not set"),
        ("src={file}", "id= is required"),
        ("id=a,src={file},env=X", "src= or env=, not both"),
        ("id=-a,src={file}", "an id is 1 to 64 of"),
        ("id=a,type=blob,src={file}", "type=blob is not file or env"),
        ("id=a,type=file", "type=file needs src=FILE"),
        ("my-token-value", "a field without = is not one of"),
        ("id=a,value=hunter2", "value= is not one of"),
        ("id=a,src={big}", f"over the limit of {MAX_SECRET_BYTES} bytes"),
    ],
)
def test_agentctl_refuses_bad_secret_specs(short_tmp: Path, spec: str, message: str) -> None:
    paths = {
        "missing": str(short_tmp / "missing"),
        "dir": str(short_tmp),
        "file": str(short_tmp / "ok"),
        "big": str(short_tmp / "big"),
    }
    Path(paths["file"]).write_text("ok-value")
    Path(paths["big"]).write_bytes(b"x" * (MAX_SECRET_BYTES + 1))
    with pytest.raises(UsageError) as err:
        read_secrets([spec.format(**paths)], {"X": "x"})
    assert message.format(**paths) in str(err.value)
    assert "hunter2" not in str(err.value) and "my-token-value" not in str(err.value)


def test_agentctl_refuses_duplicates_and_too_many(short_tmp: Path) -> None:
    env = {f"S{i}": "v" for i in range(33)}
    with pytest.raises(UsageError, match="given twice"):
        read_secrets(["id=S1", "id=S1"], env)
    with pytest.raises(UsageError, match="at most 32"):
        read_secrets([f"id=S{i}" for i in range(33)], env)


# --- the toolchains' argv --------------------------------------------------------------------


@pytest.fixture
def standins(short_tmp: Path) -> Standins:
    return install(short_tmp / "bin")


async def test_buildkit_passes_fds_and_buildctl_reads_the_values(
    short_tmp: Path, standins: Standins, registry: Registry, base_image: str
) -> None:
    bins = BuildkitBinaries(
        standins.path("buildkitd"), standins.path("buildctl"), standins.path("crane")
    )
    tc = BuildkitToolchain(
        **_dirs(short_tmp),
        registry=CollectorRegistry(),
        sandbox=OffSandbox(),
        proxy=DirectPort(registry.host),
        binaries=bins,
        policy=FAST,
        cleanup=lambda pidfile, root: None,
    )
    await tc.start()
    ctx = write_context(short_tmp / "ctx", {"Dockerfile": f"FROM {base_image}\nRUN true\n"})
    ctx_fd = os.open(ctx, os.O_RDONLY | os.O_DIRECTORY)
    values = {"tok": b"bk-" + uuid.uuid4().hex.encode(), "other": b"\x00binary\xff"}
    try:
        with secret_fds(values) as fds:
            spec = BuildSpec(
                context_fd=ctx_fd,
                dockerfile="Dockerfile",
                push_ref=f"{registry.host}/bk-secret:1",
                secrets=fds,
            )
            argv = tc.build_argv(spec, "/m.json")
            await tc.build(spec, Sink())
        by_id = dict(fds)
    finally:
        os.close(ctx_fd)
        await tc.close()
    at = argv.index("--secret")
    assert argv[at : at + 4] == [
        "--secret", f"id=other,src=/dev/fd/{by_id['other']}",
        "--secret", f"id=tok,src=/dev/fd/{by_id['tok']}",
    ]  # fmt: skip
    (call,) = [c for c in standins.calls("buildctl") if "build" in c["argv"]]
    assert call["argv"] == [*argv[1:-1], call["argv"][-1]]  # the metadata file differs
    text = " ".join(call["argv"])
    assert values["tok"].decode() not in text
    # buildctl read each value through its fd: the stand-in records their sha256.
    (read,) = standins.calls("buildctl.secrets")
    assert read["sha256"] == {k: hashlib.sha256(v).hexdigest() for k, v in values.items()}


@pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")
async def test_buildah_bud_gets_fds_and_the_run_step_reads_the_value(
    short_tmp: Path, registry: Registry, base_image: str
) -> None:
    # A wrapper that writes down buildah's argv, then runs the real buildah.
    record = short_tmp / "argv.txt"
    wrapper = short_tmp / "buildah"
    real = shutil.which("buildah")
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {record}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    tc = BuildahToolchain(
        state_dir=short_tmp / "state", sandbox=OffSandbox(), buildah=str(wrapper),
        insecure_hosts=[registry.host],
    )  # fmt: skip
    await tc.start()
    # HOME is in the child's environment: without type=file buildah would read it instead.
    value = b"bud-" + uuid.uuid4().hex.encode()
    ctx = write_context(
        short_tmp / "ctx",
        {
            "Dockerfile": f"FROM {base_image}\n"
            "RUN --mount=type=secret,id=HOME busybox sha256sum /run/secrets/HOME > /sec.txt\n"
        },
    )
    ctx_fd = os.open(ctx, os.O_RDONLY | os.O_DIRECTORY)
    push_ref = f"{registry.host}/bud-secret:{uuid.uuid4().hex[:8]}"
    try:
        with secret_fds({"HOME": value}) as fds:
            spec = BuildSpec(
                context_fd=ctx_fd, dockerfile="Dockerfile", push_ref=push_ref, secrets=fds
            )
            await tc.build(spec, Sink())
    finally:
        os.close(ctx_fd)
        await tc.close()
    ((_, fd),) = fds
    bud = next(line for line in record.read_text().splitlines() if " bud " in line)
    assert f"--secret id=HOME,src=/dev/fd/{fd},type=file" in bud
    assert value.decode() not in record.read_text()
    sec = read_from_image(push_ref, "/sec.txt").decode()
    assert sec.split()[0] == hashlib.sha256(value).hexdigest()


@pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")
async def test_secret_copies_a_killed_buildah_left_are_removed_at_start(short_tmp: Path) -> None:
    # What buildah 1.28 leaves when killed mid-RUN: the copy it made to mount the secret.
    ctr = short_tmp / "buildah" / "storage" / "vfs-containers" / uuid.uuid4().hex / "userdata"
    (ctr / "secrets").mkdir(parents=True)
    (ctr / "secrets" / "tok").write_text("left-behind-value")
    (ctr / "config.json").write_text("{}")  # buildah's own files there are kept
    # vfs: this store's driver (another driver's leftovers are dropped whole at start).
    tc = BuildahToolchain(state_dir=short_tmp, sandbox=OffSandbox(), driver="vfs")
    await tc.start()
    try:
        assert not (ctr / "secrets").exists()
        assert (ctr / "config.json").exists()
    finally:
        await tc.close()
