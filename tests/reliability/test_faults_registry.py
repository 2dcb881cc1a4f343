"""Faults outside the daemon: the registry stopped mid-push then restarted, a registry answering
429 then 200, a slow registry, a credential helper that hangs, and a full state directory.

The registry faults are injected by a TCP relay written here (tests/reliability/_relay.py) in
front of a real docker-registry; the target images go to the relay's address, the FROM image
comes from the session registry. The toolchain is the BuildKit stand-ins, which really push and
copy with skopeo through the daemon's proxy; where the builder's own push, retries and kill on
timeout matter (the registry stopped mid-push, the slow registry) real buildah runs too. Each
test ends with: the documented state and a clear error, the next build succeeds, every record
parses and every log reads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.build.child import descendants
from tests.infra.builds import metrics, wait_for, write_context
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry, start_registry
from tests.reliability._relay import Relay
from tests.reliability._support import (
    TOOLCHAINS,
    check_state_dir,
    cmdline,
    run_build,
    standin_daemon,
    toolchain_daemon,
)


@dataclass(frozen=True)
class _Host:
    host: str


def _ctx(tmp: Path, base: str) -> Path:
    name = uuid.uuid4().hex[:12]
    return write_context(tmp / name, {"Dockerfile": f"FROM {base}\nRUN echo {name}\n"})


@pytest.fixture
def relay(registry: Registry) -> Iterator[Relay]:
    r = Relay(registry.port).start()
    try:
        yield r
    finally:
        r.stop()


def _registries(*hosts: str) -> list[dict[str, object]]:
    return [{"host": h, "http": True} for h in hosts]


@pytest.fixture
def relay_daemon(
    request: pytest.FixtureRequest, short_tmp: Path, registry: Registry, relay: Relay
) -> Iterator[DaemonProcess]:
    """A daemon whose proxy knows the session registry and the relay in front of it; on the
    stand-ins unless parametrised (indirect) with another toolchain."""
    d = toolchain_daemon(
        short_tmp,
        registry,
        getattr(request, "param", "buildkit"),
        {"proxy": {"registries": _registries(registry.host, relay.host)}},
    )
    try:
        yield d
    finally:
        try:
            d.stop()
        finally:
            d.cleanup()


@pytest.mark.parametrize("toolchain", TOOLCHAINS)
def test_registry_stopped_mid_push_then_restarted(
    toolchain: str, short_tmp: Path, registry: Registry, base_image: str
) -> None:
    target = start_registry(short_tmp / "target-registry")
    relay = Relay(target.port).start()
    try:
        d = toolchain_daemon(
            short_tmp,
            registry,
            toolchain,
            {
                "build": {"base_repo": f"{relay.host}/base"},
                "proxy": {"registries": _registries(registry.host, relay.host)},
            },
        )
        try:
            relay.delay = 0.05  # keep the push in flight long enough to stop the registry
            relay.watch(b"/blobs/uploads/")
            with ThreadPoolExecutor(1) as pool:
                fut = pool.submit(
                    run_build, d.socket_path, _ctx(short_tmp, base_image),
                    {"target_ref": f"{relay.host}/app:1"},
                )  # fmt: skip
                assert relay.seen.wait(30), "the push never started"
                target.stop()
                out = fut.result(timeout=120)
            assert out.code in ("upstream_unavailable", "build_failed"), out
            assert relay.host in out.message, out.message
            with d.client() as c:
                assert c.call("status", {"id": out.id})["state"] == "failed"
            relay.delay = 0
            target.start()
            again = run_build(
                d.socket_path, _ctx(short_tmp, base_image), {"target_ref": f"{relay.host}/app:2"}
            )
            assert again.state == "succeeded", (again, d.log()[-2000:])
            check_state_dir(Path(d.sections["daemon"]["state_dir"]))
        finally:
            d.stop()
            d.cleanup()
    finally:
        relay.stop()
        target.stop()


def test_registry_answering_429_then_200(
    short_tmp: Path, base_image: str, relay: Relay, relay_daemon: DaemonProcess
) -> None:
    d = relay_daemon
    before = metrics(d)
    relay.answer_429 = 2
    out = run_build(
        d.socket_path, _ctx(short_tmp, base_image), {"target_ref": f"{relay.host}/r429:1"}
    )
    assert out.state == "succeeded", (out, d.log()[-2000:])
    assert relay.answered_429 == 2
    retries = sum(v for k, v in metrics(d).items() if k.startswith("build_agent_proxy_retries"))
    retries -= sum(v for k, v in before.items() if k.startswith("build_agent_proxy_retries"))
    assert retries >= 2
    check_state_dir(Path(d.sections["daemon"]["state_dir"]))


@pytest.mark.parametrize("relay_daemon", TOOLCHAINS, indirect=True)
def test_slow_registry_succeeds_and_timeout_still_applies(
    short_tmp: Path, base_image: str, relay: Relay, relay_daemon: DaemonProcess
) -> None:
    d = relay_daemon
    relay.delay = 0.02
    t0 = time.monotonic()
    slow = run_build(
        d.socket_path, _ctx(short_tmp, base_image), {"target_ref": f"{relay.host}/slow:1"}
    )
    assert slow.state == "succeeded", (slow, d.log()[-2000:])
    assert relay.requests > 0
    slow_s = time.monotonic() - t0
    relay.delay = 1.0
    late = run_build(
        d.socket_path,
        _ctx(short_tmp, base_image),
        {"target_ref": f"{relay.host}/slow:2", "timeout": 2},
    )
    assert late.code == "timed_out", late
    assert "timeout" in late.message
    relay.delay = 0
    again = run_build(
        d.socket_path, _ctx(short_tmp, base_image), {"target_ref": f"{relay.host}/slow:3"}
    )
    assert again.state == "succeeded", again
    print(f"\nslow registry (20 ms a chunk): build {slow_s:.2f}s; with 1 s a chunk: timed out")
    check_state_dir(Path(d.sections["daemon"]["state_dir"]))
    # Nothing but buildkitd stays; buildah's "rmi" of the pushed image runs after the answer.
    wait_for(
        lambda: all("buildkitd" in " ".join(cmdline(p)) for p in descendants(d.pid)),
        15,
        "only buildkitd left under the daemon",
    )


def test_credential_helper_that_hangs(
    short_tmp: Path, registry: Registry, base_image: str, request: pytest.FixtureRequest
) -> None:
    # The helper is asked only when a registry challenges: an htpasswd registry does.
    guarded = start_registry(short_tmp / "auth-reg", "htpasswd", username="u", password="p")
    request.addfinalizer(guarded.stop)  # also when the daemon below fails to start
    bindir = short_tmp / "helpers"
    bindir.mkdir()
    helper = bindir / "docker-credential-hang"
    helper.write_text("#!/bin/sh\nexec sleep 600\n")
    helper.chmod(0o755)
    config = short_tmp / "docker-config.json"
    config.write_text(json.dumps({"credHelpers": {guarded.host: "hang"}}))
    d, _ = standin_daemon(
        short_tmp,
        registry,
        {
            "build": {"docker_config": str(config)},
            "proxy": {"registries": _registries(registry.host, guarded.host), "helper_timeout": 1},
        },
        env={"PATH": f"{bindir}:{os.environ['PATH']}"},
    )
    try:
        t0 = time.monotonic()
        out = run_build(
            d.socket_path, _ctx(short_tmp, base_image), {"target_ref": f"{guarded.host}/cred:1"}
        )
        assert out.state == "" and out.code != "", out
        assert "helper" in out.message and "proxy.helper_timeout" in out.message, out.message
        assert time.monotonic() - t0 < 60
        assert not [p for p in descendants(d.pid) if "sleep 600" in " ".join(cmdline(p))]
        # Registries the helper does not cover are unaffected.
        ok = run_build(
            d.socket_path, _ctx(short_tmp, base_image), {"target_ref": f"{registry.host}/cred:2"}
        )
        assert ok.state == "succeeded", ok
        check_state_dir(Path(d.sections["daemon"]["state_dir"]))
    finally:
        d.stop()
        d.cleanup()


def _fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full."""
    chunk = b"\0" * 65536
    with open(path, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with contextlib.suppress(OSError), open(path, "ab") as f:  # the last partial page
        while True:
            f.write(b"\0" * 512)
            f.flush()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_state_directory_full(short_tmp: Path, registry: Registry, base_image: str) -> None:
    state = short_tmp / "d" / "state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state)], check=True)
    try:
        d, _ = standin_daemon(short_tmp, registry)
        try:
            first = run_build(
                d.socket_path, _ctx(short_tmp, base_image), {"target_ref": f"{registry.host}/df:1"}
            )
            assert first.state == "succeeded", first
            filler = state / "filler"
            _fill(filler)
            full = run_build(
                d.socket_path, _ctx(short_tmp, base_image), {"target_ref": f"{registry.host}/df:2"}
            )
            # The documented state: refused or failed with an error that says the disk is full.
            assert full.state != "succeeded" or full.code, full
            assert "space" in full.message.lower() or "full" in full.message.lower(), full
            assert d.ctl("ping").returncode == 0
            filler.unlink()
            again = run_build(
                d.socket_path, _ctx(short_tmp, base_image), {"target_ref": f"{registry.host}/df:3"}
            )
            assert again.state == "succeeded", (again, d.log()[-2000:])
            check_state_dir(state)
        finally:
            d.stop()
            d.cleanup()
        check_state_dir(state)
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
