"""Builds end to end: the real daemon, real agentctl, buildah + skopeo, docker-registry.

One daemon serves the whole module (the builds use unique content where they must not hit the
cache); the queue, cancellation and crash tests have daemons of their own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctl.client import Client
from tests.infra.builds import (
    metrics,
    read_from_image,
    start_build_daemon,
    tool_runs,
    write_context,
)
from tests.infra.daemon import AGENTCTL, REPO, DaemonProcess
from tests.infra.registry import Registry, start_registry

pytestmark = pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")


@pytest.fixture(scope="module")
def auth_registry(session_tmp: Path) -> Iterator[Registry]:
    reg = start_registry(
        session_tmp / "registry-htpasswd-build", "htpasswd", username="alice", password="s3cret"
    )
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def daemon(
    registry: Registry, auth_registry: Registry, base_image: str, session_tmp: Path
) -> Iterator[DaemonProcess]:
    d = start_build_daemon(session_tmp / "build-daemon", [registry, auth_registry])
    try:
        yield d
    finally:
        d.stop()
        d.cleanup()


def dockerfile(base: str, *lines: str) -> str:
    return "\n".join([f"FROM {base}", *lines]) + "\n"


def example(tmp: Path, base: str, marker: str | None = None) -> Path:
    marker = marker or uuid.uuid4().hex
    return write_context(
        tmp / "ctx",
        {
            "Dockerfile": dockerfile(
                base, "COPY hello.txt /hello.txt", "RUN echo built-$(cat /hello.txt) > /out.txt"
            ),
            "hello.txt": marker,
            ".dockerignore": "notes/\n*.tmp\n",
            "notes/todo.md": "not part of the image\n",
        },
    )


def build(d: DaemonProcess, *args: str, **kw: Any) -> dict[str, Any]:
    r = d.ctl("--json", "build", *args, **kw)
    out = json.loads(r.stdout) if r.stdout.strip() else {}
    out["_rc"] = r.returncode
    out["_stderr"] = r.stderr
    return out


def test_image_lands_with_run_output_and_second_build_hits_cache(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    ctx = example(short_tmp, base_image, "one")
    repo = f"{registry.host}/ws-{uuid.uuid4().hex[:8]}"
    first = build(daemon, "--context", str(ctx), "--target-repo", repo)
    assert first["_rc"] == 0, first["_stderr"]
    assert first["state"] == "succeeded"
    assert first["cache"] == {"base": False, "workspace": False}
    assert first["target_ref"].startswith(repo + ":")
    assert first["digest"].startswith("sha256:")
    assert read_from_image(first["target_ref"], "/out.txt") == b"built-one\n"
    assert read_from_image(first["target_ref"], "/hello.txt") == b"one"
    second = build(daemon, "--context", str(ctx), "--target-repo", repo)
    assert second["_rc"] == 0
    assert second["cache"] == {"base": True, "workspace": True}
    assert (second["target_ref"], second["digest"]) == (first["target_ref"], first["digest"])
    # agentctl's plain output: the pushed ref and digest on stdout
    r = daemon.ctl("build", "--context", str(ctx), "--target-repo", repo)
    assert r.returncode == 0
    assert r.stdout.strip() == f"{first['target_ref']}@{first['digest']}"


def test_copied_file_change_rebuilds_ignored_file_change_does_not(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    ctx = example(short_tmp, base_image)
    repo = f"{registry.host}/ws-{uuid.uuid4().hex[:8]}"
    first = build(daemon, "--context", str(ctx), "--target-repo", repo)
    assert first["_rc"] == 0, first["_stderr"]
    (ctx / "notes" / "todo.md").write_text("changed, but ignored\n")
    (ctx / "scratch.tmp").write_text("also ignored\n")
    ignored = build(daemon, "--context", str(ctx), "--target-repo", repo)
    assert ignored["cache"] == {"base": True, "workspace": True}
    assert ignored["base_ref"] == first["base_ref"]
    (ctx / "hello.txt").write_text("two")
    changed = build(daemon, "--context", str(ctx), "--target-repo", repo)
    assert changed["_rc"] == 0, changed["_stderr"]
    assert changed["cache"] == {"base": False, "workspace": False}
    assert changed["base_ref"] != first["base_ref"]
    assert changed["target_ref"] != first["target_ref"]
    assert read_from_image(changed["target_ref"], "/out.txt") == b"built-two\n"


def test_force_rebuilds(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    ctx = example(short_tmp, base_image)
    target = f"{registry.host}/ws-force:latest"
    assert build(daemon, "--context", str(ctx), "--target", target)["_rc"] == 0
    runs = tool_runs(daemon)
    forced = build(daemon, "--context", str(ctx), "--target", target, "--force")
    assert forced["_rc"] == 0, forced["_stderr"]
    assert forced["cache"] == {"base": False, "workspace": False}
    assert tool_runs(daemon) == runs + 1
    m = metrics(daemon)
    assert m['build_agent_builds_finished_total{outcome="succeeded"}'] >= 2
    assert m['build_agent_build_cache_hits_total{kind="workspace"}'] >= 1
    assert m['build_agent_build_phase_duration_seconds_count{phase="base_build"}'] >= 1
    assert m["build_agent_builds_active"] == 0 and m["build_agent_builds_queued"] == 0
    with daemon.client() as c:
        assert c.call("info")["config"]["toolchain"] == "buildah"


def test_ref_only_build_copies_the_base(
    daemon: DaemonProcess, registry: Registry, base_image: str
) -> None:
    base = build(daemon, "--base", base_image, "--target", f"{registry.host}/ws-copy:1")
    assert base["_rc"] == 0, base["_stderr"]
    assert base["cache"]["base"] is None and base["cache"]["workspace"] is False
    assert read_from_image(base["target_ref"], "/bin/busybox")[:4] == b"\x7fELF"
    with daemon.client() as c:
        digest = c.call("status", {"id": base["id"]})["digest"]
    assert digest == base["digest"]
    again = build(daemon, "--base", base_image, "--target-repo", f"{registry.host}/ws-copy")
    assert again["_rc"] == 0 and again["digest"] == base["digest"]


def _client_build(d: DaemonProcess, ctx: Path, args: dict[str, Any]) -> dict[str, Any]:
    fd = os.open(ctx, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with Client.connect(d.socket_path, timeout=60) as c:
            call = c.start("build", args, fds=[fd])
            os.close(fd)
            fd = -1
            logs = "".join(e.data["data"] for e in call if e.name == "log")
            result: dict[str, Any] = call.result()
            result["_log"] = logs
            return result
    finally:
        if fd >= 0:
            os.close(fd)


def test_ten_identical_builds_run_the_builder_once(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    ctx = example(short_tmp, base_image)
    runs = tool_runs(daemon)
    args = {"target_repo": f"{registry.host}/ws-dedupe"}
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(_client_build(daemon, ctx, args))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 10
    assert tool_runs(daemon) == runs + 1
    assert len({(r["id"], r["target_ref"], r["digest"]) for r in results}) == 1
    assert all("STEP 3/3: RUN" in r["_log"] for r in results)  # every caller saw the log


def test_two_slots_six_builds_all_finish(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    contexts = [example(short_tmp / str(i), base_image) for i in range(6)]
    results: list[dict[str, Any]] = []

    def one(ctx: Path) -> None:
        results.append(_client_build(daemon, ctx, {"target_repo": f"{registry.host}/ws-six"}))

    threads = [threading.Thread(target=one, args=(c,)) for c in contexts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 6
    assert all(r["state"] == "succeeded" for r in results)
    assert len({r["digest"] for r in results}) == 6


def test_bob_environment_builds_like_flags(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    ctx = example(short_tmp, base_image)
    (ctx / "sub").mkdir()
    (ctx / "Dockerfile").rename(ctx / "sub" / "Dockerfile")
    target = f"{registry.host}/ws-bob:{uuid.uuid4().hex[:8]}"
    flags = build(
        daemon,
        "--context",
        str(ctx),
        "--file",
        "sub/Dockerfile",
        "--base-repo",
        f"{registry.host}/bob-base",
        "--target",
        target,
    )
    assert flags["_rc"] == 0, flags["_stderr"]
    env = {
        "BOB_TARGET_REF": target,
        "BOB_BASE_REF": f"{registry.host}/bob-base:whatever",
        "BOB_BUILD_BASE": "true",
        "BOB_DOCKERFILE_PATH": str(ctx / "sub" / "Dockerfile"),
        "BOB_CONTEXT_DIR": str(ctx),
    }
    bob = build(daemon, env=env)
    assert bob["_rc"] == 0, bob["_stderr"]
    for key in ("target_ref", "digest", "base_ref"):
        assert bob[key] == flags[key]
    assert bob["cache"] == {"base": True, "workspace": True}


# --- failures -----------------------------------------------------------------------------------


def _failed(d: DaemonProcess, ctx: Path, target: str, *extra: str) -> dict[str, Any]:
    r = d.ctl("--json", "build", "--context", str(ctx), "--target", target, *extra)
    assert r.returncode == 1, (r.stdout, r.stderr)
    error: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])["error"]
    error["_stderr"] = r.stderr
    return error


def test_run_step_failure_names_the_line_and_status(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    ctx = write_context(
        short_tmp / "c",
        {"Dockerfile": dockerfile(base_image, "RUN echo about-to-fail && exit 3")},
    )
    err = _failed(daemon, ctx, f"{registry.host}/ws-fail:1")
    assert err["code"] == "build_failed"
    assert "line 2" in err["message"] and "exit status 3" in err["message"]
    assert "RUN echo about-to-fail && exit 3" in err["message"]
    assert "about-to-fail" in err["details"]["log_tail"]
    # The keys BuildKit's are too (test_buildkit_e2e.py, test_error_details.py).
    assert set(err["details"]) == {
        "id", "log_tail", "tool_exit_code", "reason", "step", "line", "exit_code"
    }  # fmt: skip
    assert (err["details"]["line"], err["details"]["exit_code"]) == (2, 3)
    with daemon.client() as c:
        record = c.call("status", {"id": err["details"]["id"]})
    assert record["state"] == "failed" and record["error"]["code"] == "build_failed"


@pytest.mark.parametrize("source", ["missing.txt", "sub/missing.txt"])
def test_missing_copy_source_is_named_inside_the_context(
    source: str, daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    """buildah names the daemon's staging copy of the context; the error names the path inside
    the caller's context, and no directory of the daemon's."""
    ctx = write_context(
        short_tmp / "c",
        {"Dockerfile": dockerfile(base_image, f"COPY {source} /x"), "sub/other": "x"},
    )
    err = _failed(daemon, ctx, f"{registry.host}/ws-fail:copy")
    assert err["code"] == "build_failed"
    assert err["message"].startswith(
        f"Dockerfile line 2: COPY {source} /x failed: {source} is not in the build context"
    ), err["message"]
    state = daemon.sections["daemon"]["state_dir"]
    assert state not in err["message"] and "contexts/ctx-" not in err["message"]
    assert err["details"]["missing_path"] == source


def test_dockerfile_syntax_error(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    ctx = write_context(short_tmp / "c", {"Dockerfile": dockerfile(base_image, "RUNN echo typo")})
    err = _failed(daemon, ctx, f"{registry.host}/ws-fail:2")
    assert err["code"] == "build_failed"
    assert "unknown instruction" in err["message"] and "RUNN" in err["message"]
    assert "line 2" in err["message"]


def test_missing_base_image(daemon: DaemonProcess, registry: Registry, short_tmp: Path) -> None:
    missing = f"{registry.host}/does-not-exist:latest"
    ctx = write_context(short_tmp / "c", {"Dockerfile": dockerfile(missing, "RUN true")})
    err = _failed(daemon, ctx, f"{registry.host}/ws-fail:3")
    assert err["code"] == "build_failed"
    assert "does-not-exist" in err["message"] and "does not exist" in err["message"]
    r = daemon.ctl("build", "--base", missing, "--target", f"{registry.host}/ws-fail:4")
    assert r.returncode == 1 and "not_found" in r.stderr and "does-not-exist" in r.stderr


def test_push_refused_without_credentials(
    daemon: DaemonProcess, auth_registry: Registry, base_image: str, short_tmp: Path
) -> None:
    ctx = example(short_tmp, base_image)
    where = ["--base-repo", f"{auth_registry.host}/base"]
    # The cache check (HEAD) is refused first; with --force the build runs and its push is.
    for extra in ([], ["--force"]):
        err = _failed(daemon, ctx, f"{auth_registry.host}/ws:1", *where, *extra)
        assert err["code"] == "upstream_unauthorized", err
        assert auth_registry.host in err["message"]
        assert "s3cret" not in json.dumps(err)
        # No proxy capability (32 hex digits) in the error, the record or the log.
        record_path = daemon.tmp / "state" / "builds" / f"{err['details']['id']}.json"
        log_path = record_path.with_suffix(".log")
        for text in (json.dumps(err), record_path.read_text(), log_path.read_text()):
            assert not re.search(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])", text), text
    assert "STEP 3/3: RUN" in log_path.read_text()  # the forced one did build before the push


def test_bad_references_are_refused_before_anything_runs(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    ctx = example(short_tmp, base_image)
    for target in ("UPPER/Case:1", f"{registry.host}/ws:bad tag", f"{registry.host}/ws@sha256:xyz"):
        err = _failed(daemon, ctx, target)
        assert err["code"] == "bad_request", (target, err)
        assert "is not an image reference" in err["message"], err["message"]
    r = daemon.ctl("build", "--base", f"{registry.host}/Nope:1", "--target", f"{registry.host}/w:1")
    assert r.returncode == 1 and "bad_request" in r.stderr and "Nope" in r.stderr
    assert daemon.ctl("ping").returncode == 0


def test_dockerfile_escaping_the_context_is_refused(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    outside = write_context(short_tmp / "outside", {"Dockerfile": dockerfile(base_image)})
    ctx = write_context(short_tmp / "c", {"x": "y"})
    (ctx / "link").symlink_to(outside / "Dockerfile")
    (ctx / "rel").symlink_to("../outside/Dockerfile")
    target = f"{registry.host}/ws-fail:5"
    for path in ("../outside/Dockerfile", "/etc/passwd", "link", "rel"):
        err = _failed(daemon, ctx, target, "--file", path)
        assert err["code"] == "bad_request", (path, err)
        assert "context" in err["message"], err["message"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
def test_context_the_caller_cannot_read(
    registry: Registry, base_image: str, short_tmp: Path
) -> None:
    import grp

    nogroup = grp.getgrgid(65534).gr_name
    d = DaemonProcess(
        short_tmp / "d",
        {
            "daemon": {"socket_group": nogroup, "allowed_uids": [0, 65534]},
            "build": {"base_repo": f"{registry.host}/base", "toolchain": "buildah"},
            "proxy": {"registries": [{"host": registry.host, "http": True}]},
        },
    )
    os.chmod(d.sock_dir, 0o755)
    d.start()
    try:
        os.chmod(short_tmp, 0o755)
        ctx = example(short_tmp, base_image)
        os.chmod(ctx, 0o700)  # root's, closed to nobody
        target = f"{registry.host}/ws-nobody:1"
        r = d.ctl("build", "--context", str(ctx), "--target", target, user=65534)
        assert r.returncode == 1 and "cannot open the context directory" in r.stderr
        # A readable directory holding a file nobody may read: the daemon refuses it.
        os.chmod(ctx, 0o755)
        os.chmod(ctx / "hello.txt", 0o600)
        r = d.ctl("build", "--context", str(ctx), "--target", target, user=65534)
        assert r.returncode == 1, r.stderr
        assert "forbidden" in r.stderr and "hello.txt" in r.stderr
        os.chmod(ctx / "hello.txt", 0o644)
        r = d.ctl("build", "--context", str(ctx), "--target", target, user=65534)
        assert r.returncode == 0, r.stderr
    finally:
        d.stop()
        d.cleanup()


def test_progress_line_on_a_terminal(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    import pty
    import subprocess

    from tests.infra.daemon import AGENTCTL

    ctx = example(short_tmp, base_image)
    master, slave = pty.openpty()
    seen = bytearray()

    def drain() -> None:  # read as it comes: a full terminal buffer would block agentctl
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed and everything was read
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        proc = subprocess.run(
            [*AGENTCTL, "--socket", daemon.socket_path, "build", "--context", str(ctx),
             "--target", f"{registry.host}/ws-tty:1"],
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=60,
            text=True,
        )  # fmt: skip
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    assert proc.returncode == 0
    assert b"\r\x1b[2K" in seen  # the progress line is redrawn in place
    assert b"running (base_build)" in seen and b"STEP 3/3: RUN" in seen
    assert "@sha256:" in proc.stdout and "\x1b" not in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root")
def test_context_fd_from_another_mount_namespace_is_what_gets_built(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    """A workspace container's agentctl: its context path means something else (or nothing) in
    the daemon's mount namespace. The build must read the directory the fd names, not the path."""
    path = short_tmp / "ctx"
    marker = uuid.uuid4().hex
    write_context(  # the node's view of the path: must not be built
        path, {"Dockerfile": dockerfile(base_image, "RUN echo node-view > /who.txt")}
    )
    caller_dockerfile = dockerfile(
        base_image, "COPY hello.txt /hello.txt", "RUN echo caller-$(cat /hello.txt) > /who.txt"
    )
    target = f"{registry.host}/ws-mntns:{marker[:12]}"
    argv = [*AGENTCTL, "--socket", daemon.socket_path, "build", "--context", str(path)]
    # In a mount namespace of its own, a tmpfs over the path holds the caller's context.
    script = (
        f"mount -t tmpfs tmpfs {path} && cd {path} && "
        f"printf '%s' \"$DOCKERFILE\" > Dockerfile && printf '%s' {marker} > hello.txt && "
        f"exec {' '.join(argv)} --target {target}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    env.update({"PYTHONPATH": str(REPO), "DOCKERFILE": caller_dockerfile})
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr + daemon.log()[-3000:]
    assert read_from_image(target, "/who.txt") == f"caller-{marker}\n".encode()
    assert not (path / "hello.txt").exists()  # the node's view was never touched
