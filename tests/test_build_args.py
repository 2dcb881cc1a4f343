"""Build-arg values (issue 11, attack 4): off every command line while a real buildah build runs,
in the RUN step that uses them, and masked in the log when the name looks secret.

The real daemon over its socket, real agentctl, buildah + skopeo, docker-registry. ``ps`` runs as
nobody: what any local user sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.build.buildargs import env_safe, looks_secret, split_for_env
from agent.build.child import proc_read
from tests.infra.builds import (
    build_sections,
    log_of,
    start_build_daemon,
    status,
    wait_for,
    write_context,
)
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry
from tests.infra.sandbox_env import nat_subnet, unique_netns
from tests.standins import install

NOBODY = 65534


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
    if request.param == "sandbox":  # the values pass through the sandbox's exec helper too
        extra["sandbox"] = {"mode": "on", "netns": unique_netns(), "nat_subnet": nat_subnet()}
    d = start_build_daemon(session_tmp / f"buildargs-{request.param}", [registry], extra)
    try:
        yield d
    finally:
        d.stop()
        d.cleanup()


def _command_lines_holding(needles: list[bytes]) -> list[str]:
    found = []
    for pid, cmdline in proc_read("cmdline"):
        for n in needles:
            if n in cmdline:
                shown = cmdline.replace(b"\0", b" ")[:300]
                found.append(f"{pid}: {shown!r}")
    return found


@pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")
@pytest.mark.skipif(os.geteuid() != 0, reason="ps as another uid needs root to switch")
def test_build_arg_values_are_on_no_command_line_and_secret_ones_not_in_the_log(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    plain = f"plain-{uuid.uuid4().hex}"
    marker = uuid.uuid4().hex
    ctx = write_context(
        short_tmp / "ctx",
        {
            "Dockerfile": (
                f"FROM {base_image}\nARG API_TOKEN\nARG PLAIN\n"
                'RUN echo "plain=$PLAIN" && echo "tok=$API_TOKEN" '
                '&& printf %s "$API_TOKEN" | busybox sha256sum '
                f"&& echo started-{marker} && sleep 4\n"
            )
        },
    )
    target = f"{registry.host}/buildargs:{marker[:8]}"
    r = daemon.ctl(
        "build", "--detach", "--context", str(ctx), "--target", target,
        "--build-arg", f"API_TOKEN={token}", "--build-arg", f"PLAIN={plain}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    build_id = r.stdout.strip()
    seen: list[str] = []
    ps_seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        # Every command line while the build runs, as root (/proc) and as nobody (ps).
        while not stop.is_set():
            seen.extend(_command_lines_holding([token.encode(), plain.encode()]))
            ps = subprocess.run(
                ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "ps", "-eo", "pid,args", "ww"],
                capture_output=True, text=True, timeout=10, cwd="/",
            )  # fmt: skip
            ps_seen.extend(ln for ln in ps.stdout.splitlines() if token in ln or plain in ln)
            stop.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        wait_for(lambda: f"started-{marker}" in log_of(daemon, build_id), 60, "the RUN step")
        final = wait_for(
            lambda: (s := status(daemon, build_id))["state"] not in ("queued", "running") and s,
            90,
            "the build to end",
        )
    finally:
        stop.set()
        watcher.join(15)
    assert final["state"] == "succeeded", final
    assert not seen, seen
    assert not ps_seen, ps_seen
    log = log_of(daemon, build_id)
    assert f"plain={plain}" in log  # a plain value reaches the RUN step and the log
    assert token not in log and "tok=***" in log  # a secret-looking one is masked
    assert hashlib.sha256(token.encode()).hexdigest() in log  # and did reach the RUN step
    record = json.dumps(status(daemon, build_id))
    assert token not in record and plain not in record
    assert token not in daemon.log()


def test_which_names_travel_in_the_environment() -> None:
    env, argv = split_for_env(
        {"API_TOKEN": "a", "plain": "b", "LD_PRELOAD": "c", "HTTP_PROXY": "d", "http_proxy": "e",
         "GODEBUG": "f", "BUILDAH_ISOLATION": "g", "PATH": "h", "my.arg": "i", "_X": "j"}
    )  # fmt: skip
    assert env == {"API_TOKEN": "a", "plain": "b"}
    assert set(argv) == {
        "LD_PRELOAD", "HTTP_PROXY", "http_proxy", "GODEBUG", "BUILDAH_ISOLATION", "PATH",
        "my.arg", "_X",
    }  # fmt: skip
    assert env_safe("NPM_TOKEN") and not env_safe("LC_ALL")
    for name in ("NPM_TOKEN", "db_password", "ClientSecret", "SSH_KEY", "apikey"):
        assert looks_secret(name), name
    assert not looks_secret("VERSION")


def test_buildkit_warns_that_build_arg_values_are_on_buildctls_command_line(
    short_tmp: Path, registry: Registry, base_image: str
) -> None:
    """BuildKit has no other way in for them (docs/builds.md#build-args): the log says so for a
    secret-looking name, and masks its value like buildah's."""
    standins = install(short_tmp / "bin")
    d = DaemonProcess(
        short_tmp / "d",
        build_sections([registry], {"build": {"toolchain": "buildkit"}}),
        env=standins.env(),
    )
    token = f"tok-{uuid.uuid4().hex}"
    try:
        d.start(timeout=30)
        ctx = write_context(
            short_tmp / "ctx", {"Dockerfile": f"FROM {base_image}\nARG NPM_TOKEN\n"}
        )
        r = d.ctl(
            "build", "--context", str(ctx), "--target", f"{registry.host}/bk-args:1",
            "--build-arg", f"NPM_TOKEN={token}", "--build-arg", "VERSION=1",
            timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "build-arg values are on buildctl's command line" in r.stdout + r.stderr
        assert "(NPM_TOKEN)" in r.stdout + r.stderr and "VERSION" not in r.stdout + r.stderr
        assert token not in r.stdout + r.stderr
    finally:
        d.stop()
        d.cleanup()
