"""Contract tests of the BuildKit toolchain against the stand-ins (tests/standins) and, whenever
they are installed, the real buildkitd/buildctl/crane (``pytest -m buildkit``).

The registry is a real docker-registry; the "proxy" is :class:`DirectPort`, a RegistryPort that
points children straight at it (the proxy's own tests cover the proxy)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import signal
import time
import tomllib
import urllib.request
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.build._buildkitd import parse_workers, render_config
from agent.build._supervisor import Policy, State
from agent.build.buildkit import BuildkitBinaries, BuildkitToolchain, buildkit_binaries
from agent.build.toolchain import BuildSpec
from agent.contracts import Mirror
from agent.errors import (
    BuildFailed,
    InternalError,
    NotFound,
    StartupError,
    UpstreamUnauthorized,
)
from agent.sandbox import OffSandbox
from tests.infra.registry import Registry, start_registry
from tests.standins import FIXTURES_DIR, VERSIONS, Standins, install

REAL = buildkit_binaries()
FAST = Policy(
    backoff_base=0.05,
    backoff_cap=0.2,
    jitter=0.2,
    quick_window=5.0,
    max_quick_failures=3,
    ready_timeout=10.0,
    probe_interval=0.05,
    stop_grace=3.0,
)


class DirectPort:
    """RegistryPort with the registry itself as the children's address (no proxy in between)."""

    def __init__(self, host: str, mirrors: list[Mirror] | None = None) -> None:
        self.child_address = host
        self.host_address = host
        self._mirrors = mirrors or []

    def mirrors(self) -> list[Mirror]:
        return list(self._mirrors)

    def scrub(self, text: str) -> str:
        return text.replace("cap-SECRET", "***")


class Sink:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.event = asyncio.Event()
        self.wanted = ""

    def line(self, text: str) -> None:
        self.lines.append(text)
        if self.wanted and self.wanted in text:
            self.event.set()


def _dirs(tmp: Path) -> dict[str, str]:
    return {"state_dir": str(tmp / "state"), "runtime_dir": str(tmp / "run")}


@pytest.fixture
def standins(request: pytest.FixtureRequest, short_tmp: Path) -> Standins:
    """The stand-ins, impersonating the BuildKit version that ``bins`` names (when it does)."""
    callspec = getattr(request.node, "callspec", None)
    param = callspec.params.get("bins", "") if callspec is not None else ""
    version = param.rpartition("-")[2] if param.startswith("standin-") else VERSIONS[0]
    return install(short_tmp / "bin", version=version)


@pytest.fixture(
    params=[*(f"standin-{v}" for v in VERSIONS), pytest.param("real", marks=pytest.mark.buildkit)]
)
def bins(request: pytest.FixtureRequest, standins: Standins) -> BuildkitBinaries:
    if request.param == "real":
        if REAL is None:
            pytest.skip("real buildkitd/buildctl/crane not installed")
        return REAL
    return BuildkitBinaries(
        standins.path("buildkitd"), standins.path("buildctl"), standins.path("crane")
    )


@pytest.fixture
async def toolchain_factory(short_tmp: Path, registry: Registry) -> AsyncIterator[Any]:
    made: list[BuildkitToolchain] = []

    def make(
        bins: BuildkitBinaries, *, policy: Policy = FAST, port: Any = None, cleanup: Any = None
    ) -> BuildkitToolchain:
        metrics = CollectorRegistry()
        tc = BuildkitToolchain(
            **_dirs(short_tmp),
            registry=metrics,
            sandbox=OffSandbox(),
            proxy=port or DirectPort(registry.host),
            binaries=bins,
            policy=policy,
            cleanup=cleanup or (lambda pidfile, root: None),
        )
        made.append(tc)
        _registries[tc] = metrics
        return tc

    yield make
    for tc in made:
        await tc.close()


# The metrics registry each toolchain_factory toolchain was made with.
_registries: weakref.WeakKeyDictionary[BuildkitToolchain, CollectorRegistry] = (
    weakref.WeakKeyDictionary()
)


def _metric(tc: BuildkitToolchain, name: str, **labels: str) -> float | None:
    return _registries[tc].get_sample_value(name, labels)


@pytest.fixture
def context_dir(short_tmp: Path, base_image: str) -> Iterator[Any]:
    fds: list[int] = []

    def make(dockerfile: str, files: dict[str, str] | None = None) -> int:
        d = short_tmp / f"ctx{len(fds)}"
        d.mkdir()
        (d / "Dockerfile").write_text(dockerfile.replace("BASE", base_image))
        for name, text in (files or {}).items():
            (d / name).write_text(text)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


def _manifest_digest(registry: Registry, repo: str, tag: str) -> str:
    req = urllib.request.Request(
        f"{registry.url}/v2/{repo}/manifests/{tag}",
        method="GET",
        headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json, "
            "application/vnd.docker.distribution.manifest.v2+json"
        },
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return "sha256:" + hashlib.sha256(r.read()).hexdigest()


# --- pure parts ---------------------------------------------------------------------------------


def test_buildkit_binaries_from_env_and_path(standins: Standins, tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), **standins.env()}
    found = buildkit_binaries(env)
    assert found == BuildkitBinaries(
        standins.path("buildkitd"), standins.path("buildctl"), standins.path("crane")
    )
    assert buildkit_binaries({"PATH": str(standins.bindir)}) == found
    env.pop("AGENT_CRANE")
    assert buildkit_binaries(env) is None  # crane neither named nor on PATH


def test_render_config_marks_proxy_plain_http_and_mirrors(short_tmp: Path) -> None:
    text = render_config(
        root=short_tmp / "root",
        socket=short_tmp / "bk.sock",
        proxy_address="localhost:8080",
        mirrors=[Mirror("docker.io", "mirror/docker.io"), Mirror("quay.io", "mirror/quay.io")],
    )
    conf = tomllib.loads(text)
    assert conf["root"] == str(short_tmp / "root")
    assert conf["grpc"]["address"] == [f"unix://{short_tmp}/bk.sock"]
    # http alone: with insecure too, v0.11 tries HTTPS after HTTP and reports that failure.
    assert conf["registry"]["localhost:8080"] == {"http": True}
    assert conf["registry"]["127.0.0.1:8080"] == {"http": True}
    # No path: every BuildKit generation then sends /v2/<repo>/...?ns=<registry>.
    assert conf["registry"]["docker.io"]["mirrors"] == ["localhost:8080"]
    assert conf["registry"]["quay.io"]["mirrors"] == ["localhost:8080"]
    assert conf["worker"]["containerd"]["enabled"] is False


def test_parse_workers_reads_both_recorded_formats() -> None:
    as_json = parse_workers((FIXTURES_DIR / "workers.json").read_text())
    assert [w["id"] for w in as_json] == ["z695ed4g7v8n2k1ukbeugarj2"]
    table = parse_workers((FIXTURES_DIR / "workers.txt").read_text())
    assert [w["id"] for w in table] == ["z695ed4g7v8n2k1ukbeugarj2"]
    assert parse_workers("ID\tPLATFORMS\n") == []
    assert parse_workers("[") == []


# --- supervisor -----------------------------------------------------------------------------------


async def test_start_probes_and_reports_running(
    bins: BuildkitBinaries, toolchain_factory: Any, standins: Standins, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="agent.build")
    tc = toolchain_factory(bins)
    await tc.start()
    assert tc.state == "RUNNING"
    assert _metric(tc, "build_agent_child_up", child="buildkitd") == 1
    assert _metric(tc, "build_agent_buildkitd_state", child="buildkitd", state="RUNNING") == 1
    assert _metric(tc, "build_agent_buildkitd_state", child="buildkitd", state="STARTING") == 0
    assert tc.pidfile.read_text().strip() == str(tc.supervisor.pid)
    moves = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert moves[0] == "buildkitd: STOPPED -> STARTING (pid none)"
    assert moves[1] == f"buildkitd: STARTING -> RUNNING (pid {tc.supervisor.pid})"
    conf = tomllib.loads(tc.config_path.read_text())
    assert conf["registry"][tc.proxy.child_address]["http"] is True
    if bins.buildkitd == standins.path("buildkitd"):
        (daemon,) = standins.calls("buildkitd")
        assert daemon["argv"] == [
            "--config", str(tc.config_path), "--root", str(tc.root),
            "--addr", f"unix://{tc.socket}", "--oci-worker-net", "host",
        ]  # fmt: skip
        probe = standins.calls("buildctl")[-1]
        assert probe["argv"] == [
            "--addr", f"unix://{tc.socket}", "debug", "workers", "--format", "{{json .}}",
        ]  # fmt: skip
    await tc.close()
    assert tc.state == "STOPPED"
    assert _metric(tc, "build_agent_child_up", child="buildkitd") == 0
    assert not tc.pidfile.exists()


async def test_buildkitd_that_exits_at_once_backs_off_then_fatal(
    standins: Standins, bins: BuildkitBinaries, toolchain_factory: Any, short_tmp: Path
) -> None:
    tc = toolchain_factory(bins)
    tc.root.parent.mkdir(parents=True)
    tc.root.write_text("not a directory")  # buildkitd cannot create its --root: exits 1
    seen: list[str] = []
    real_to = tc.supervisor._to

    def spy(new: State) -> None:
        real_to(new)
        seen.append(new.value)

    tc.supervisor._to = spy  # type: ignore[method-assign]
    t0 = time.monotonic()
    with pytest.raises(StartupError) as err:
        await tc.start()
    elapsed = time.monotonic() - t0
    assert seen == [
        "STARTING", "BACKOFF", "STARTING", "BACKOFF", "STARTING", "BACKOFF", "FATAL", "STOPPED",
    ]  # fmt: skip
    assert "exited with status 1" in err.value.message
    assert "failed to create" in err.value.message  # buildkitd's own words, from its output
    assert _metric(tc, "build_agent_child_restarts_total", child="buildkitd") == 2
    # Backoff 0.05 s then 0.1 s, minus up to 20 % jitter: bounded from below and above.
    assert 0.12 <= elapsed < 8.0
    with pytest.raises(Exception) as illegal:
        tc.supervisor._to(State.RUNNING)  # STOPPED -> RUNNING is not in the table
    assert type(illegal.value).__name__ == "IllegalTransition"


async def test_buildkitd_output_is_scrubbed_before_it_is_kept_or_logged(
    bins: BuildkitBinaries, toolchain_factory: Any, caplog: Any
) -> None:
    tc = toolchain_factory(bins)
    # buildkitd names its --root when it cannot create it; DirectPort scrubs "cap-SECRET".
    tc.root = tc.root.with_name("cap-SECRET")
    tc.root.parent.mkdir(parents=True)
    tc.root.write_text("not a directory")
    with caplog.at_level(logging.DEBUG, logger="agent.build"), pytest.raises(StartupError) as err:
        await tc.start()
    assert any("***" in ln for ln in tc.supervisor.output)
    assert not [ln for ln in tc.supervisor.output if "cap-SECRET" in ln]
    assert "***" in caplog.text and "cap-SECRET" not in caplog.text
    assert "cap-SECRET" not in err.value.message


def test_backoff_is_capped_exponential_with_jitter() -> None:
    p = Policy(backoff_base=1.0, backoff_cap=8.0, jitter=0.25)
    assert [p.delay(n, rand=lambda: 0.0) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 8, 8, 8]
    assert p.delay(3, rand=lambda: 1.0) == 3.0  # 4 s minus the full 25 %


async def test_sigkilled_buildkitd_is_restarted(
    bins: BuildkitBinaries, toolchain_factory: Any
) -> None:
    tc = toolchain_factory(bins)
    await tc.start()
    first = tc.supervisor.pid
    killed_at = time.monotonic()
    os.kill(first, signal.SIGKILL)
    assert await _restarted(tc, first)
    after = [s.value for t, s in tc.supervisor.history if t >= killed_at]
    assert after == ["BACKOFF", "STARTING", "RUNNING"]
    assert _metric(tc, "build_agent_child_restarts_total", child="buildkitd") == 1
    assert tc.pidfile.read_text().strip() == str(tc.supervisor.pid)


# --- builds --------------------------------------------------------------------------------------

OK_DOCKERFILE = (
    "FROM BASE AS final\nRUN echo building && echo step-output > /x && cat /x\n"
    "COPY hello.txt /hello.txt\nENV foo=bar\n"
)


async def test_build_pushes_and_reports_the_registry_digest(
    bins: BuildkitBinaries,
    toolchain_factory: Any,
    context_dir: Any,
    registry: Registry,
    standins: Standins,
) -> None:
    tc = toolchain_factory(bins)
    await tc.start()
    fd = context_dir(OK_DOCKERFILE, {"hello.txt": "hello\n"})
    push_ref = f"{registry.host}/bk-ok:1"
    sink = Sink()
    spec = BuildSpec(
        context_fd=fd,
        dockerfile="Dockerfile",
        push_ref=push_ref,
        build_args={"B": "2", "A": "1"},
        target="final",
        platform="linux/amd64",
    )
    out = await tc.build(spec, sink)
    assert out.digest == _manifest_digest(registry, "bk-ok", "1")
    assert any(line.startswith("#") and "DONE" in line for line in sink.lines)
    assert any(f"pushing manifest for {push_ref}@{out.digest}" in line for line in sink.lines)
    if bins.buildctl == standins.path("buildctl"):
        build = standins.calls("buildctl")[-1]["argv"]
        metadata = build[-1]
        assert build == [
            "--addr", f"unix://{tc.socket}", "build", "--frontend", "dockerfile.v0",
            "--local", f"context=/dev/fd/{fd}", "--local", f"dockerfile=/dev/fd/{fd}",
            "--opt", "filename=Dockerfile", "--opt", "target=final",
            "--opt", "platform=linux/amd64",
            "--opt", "build-arg:A=1", "--opt", "build-arg:B=2",
            "--output", f"type=image,name={push_ref},push=true",
            "--progress=plain", "--metadata-file", metadata,
        ]  # fmt: skip
        assert not await asyncio.to_thread(os.path.exists, metadata)  # its temp dir is gone


FAILURES = {
    "fail-run": (
        "FROM BASE\nRUN echo about-to-fail && exit 3\n",
        BuildFailed,
        ["Dockerfile:2", "RUN echo about-to-fail && exit 3", "exited with status 3",
         "about-to-fail"],
        {"reason": "run_failed", "exit_code": 3, "line": 2,
         "step": "RUN echo about-to-fail && exit 3"},
    ),
    "fail-syntax": (
        "FROM BASE\nRUNN echo typo\n",
        BuildFailed,
        ["Dockerfile:2", "syntax error", "unknown instruction: RUNN", "RUNN echo typo"],
        {"reason": "dockerfile_syntax", "line": 2},
    ),
    "fail-base": (
        "FROM REGISTRY/does-not-exist:latest\nRUN true\n",
        BuildFailed,
        ["Dockerfile:1", "base image REGISTRY/does-not-exist:latest could not be pulled"],
        {"reason": "base_image", "line": 1},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FAILURES))
async def test_failed_build_names_the_cause(
    case: str,
    bins: BuildkitBinaries,
    toolchain_factory: Any,
    context_dir: Any,
    registry: Registry,
) -> None:
    dockerfile, cls, words, details = FAILURES[case]
    tc = toolchain_factory(bins)
    await tc.start()
    fd = context_dir(dockerfile.replace("REGISTRY", registry.host))
    spec = BuildSpec(context_fd=fd, dockerfile="Dockerfile", push_ref=f"{registry.host}/bk:{case}")
    with pytest.raises(cls) as err:
        await tc.build(spec, Sink())
    for word in words:
        assert word.replace("REGISTRY", registry.host) in err.value.message
    for key, value in details.items():
        assert err.value.details[key] == value
    assert err.value.details["log_tail"]


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(
        tmp_path_factory.mktemp("htpasswd"), "htpasswd", username="alice", password="s3cret"
    )
    try:
        yield reg
    finally:
        reg.stop()


async def test_refused_push_is_upstream_unauthorized_naming_the_registry(
    bins: BuildkitBinaries,
    toolchain_factory: Any,
    context_dir: Any,
    registry: Registry,
    auth_registry: Registry,
) -> None:
    port = DirectPort(registry.host)
    tc = toolchain_factory(bins, port=port)
    # buildkitd.toml must allow plain HTTP to the second registry too: make it the "proxy" and
    # pull the base through a mirror entry pointing at the plain one.
    tc.proxy = DirectPort(auth_registry.host)
    await tc.start()
    text = tc.config_path.read_text().replace(
        "[registry.", f'[registry."{registry.host}"]\n  http = true\n\n[registry.', 1
    )
    tc.config_path.write_text(text)
    first = tc.supervisor.pid
    os.kill(first, signal.SIGKILL)  # restart with the edited config
    assert await _restarted(tc, first)
    fd = context_dir(OK_DOCKERFILE, {"hello.txt": "hello\n"})
    spec = BuildSpec(
        context_fd=fd, dockerfile="Dockerfile", push_ref=f"{auth_registry.host}/bk:unauth"
    )
    with pytest.raises(UpstreamUnauthorized) as err:
        await tc.build(spec, Sink())
    assert err.value.registry == auth_registry.host
    assert f"registry {auth_registry.host} refused the push" in err.value.message
    assert "401 Unauthorized" in err.value.message


async def test_buildkitd_killed_mid_build_fails_clearly_and_comes_back(
    bins: BuildkitBinaries, toolchain_factory: Any, context_dir: Any, registry: Registry
) -> None:
    from agent.build.child import descendants
    from agent.sandbox import cleanup_buildkitd

    # Unsandboxed, as the daemon runs it with sandbox.mode = "off": no PID namespace, the
    # sandbox's cleanup after every exit. runc puts a RUN step in a session of its own, so it
    # outlives a SIGKILLed buildkitd unless that cleanup kills it.
    tc = toolchain_factory(bins, cleanup=cleanup_buildkitd)
    await tc.start()
    fd = context_dir("FROM BASE\nRUN echo start && sleep 30 && echo end\n")
    spec = BuildSpec(context_fd=fd, dockerfile="Dockerfile", push_ref=f"{registry.host}/bk:slow")
    sink = Sink()
    sink.wanted = "start"
    build = asyncio.create_task(tc.build(spec, sink))
    await asyncio.wait_for(sink.event.wait(), 20)
    victim = tc.supervisor.pid
    run_step: list[int] = []  # the RUN step's processes (the stand-in's or runc's)
    deadline = time.monotonic() + 10
    while not run_step and time.monotonic() < deadline:
        run_step = descendants(victim)
        await asyncio.sleep(0.02)  # a poll with a deadline: the step starts its child
    assert run_step
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(BuildFailed) as err:
        await asyncio.wait_for(build, 20)
    assert err.value.details["reason"] == "builder_died"
    assert "buildkitd stopped during the build" in err.value.message
    assert await _restarted(tc, victim)
    for pid in run_step:  # no orphan of the killed daemon survives it
        assert "zombie" in _status(pid)


async def _restarted(tc: BuildkitToolchain, old_pid: int) -> bool:
    """True once buildkitd is RUNNING again as another process."""
    sup = tc.supervisor
    return await sup.wait_until(
        lambda: sup.state is State.RUNNING and sup.pid not in (None, old_pid), 20
    )


def _status(pid: int) -> str:
    """The process's /proc status, or "gone (zombie or reaped)"."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return "gone (zombie or reaped)"
    return "zombie" if "State:\tZ" in text else text


async def test_unreachable_buildkitd_is_an_internal_error(
    bins: BuildkitBinaries, toolchain_factory: Any, context_dir: Any, registry: Registry
) -> None:
    tc = toolchain_factory(bins)
    await tc.start()
    tc.socket.unlink()  # buildkitd runs, but nobody can dial it any more
    fd = context_dir("FROM BASE\n")
    spec = BuildSpec(context_fd=fd, dockerfile="Dockerfile", push_ref=f"{registry.host}/bk:x")
    with pytest.raises(InternalError) as err:
        await tc.build(spec, Sink())
    assert "could not reach buildkitd" in err.value.message
    assert str(tc.socket) in err.value.message


async def test_fatal_builder_refuses_builds_with_the_reason(
    bins: BuildkitBinaries, toolchain_factory: Any, context_dir: Any, registry: Registry
) -> None:
    tc = toolchain_factory(bins)
    await tc.start()
    tc.root.rename(tc.root.with_name("moved"))
    tc.root.write_text("")  # every restart now fails at once
    os.kill(tc.supervisor.pid, signal.SIGKILL)
    assert await tc.supervisor.wait_state(State.FATAL, 15)
    assert _metric(tc, "build_agent_buildkitd_state", child="buildkitd", state="FATAL") == 1
    fd = context_dir("FROM BASE\n")
    spec = BuildSpec(context_fd=fd, dockerfile="Dockerfile", push_ref=f"{registry.host}/bk:y")
    with pytest.raises(InternalError) as err:
        await tc.build(spec, Sink())
    assert "buildkitd is FATAL" in err.value.message
    # The operator fixes the cause and reloads: buildkitd starts again.
    tc.root.unlink()
    await tc.reload()
    assert await tc.supervisor.wait_state(State.RUNNING, 15)


# --- copies --------------------------------------------------------------------------------------


async def test_copy_returns_digest_and_maps_failures(
    bins: BuildkitBinaries,
    toolchain_factory: Any,
    registry: Registry,
    base_image: str,
    auth_registry: Registry,
    standins: Standins,
) -> None:
    tc = toolchain_factory(bins)
    dst = f"{registry.host}/bk-copy:1"
    digest = await tc.copy(base_image, dst, Sink())
    assert digest == _manifest_digest(registry, "bk-copy", "1")
    # Again: crane finds the manifest there and says "existing manifest" (every variant of this
    # test copies to the same tag, so the first copy may be one already).
    assert await tc.copy(base_image, dst, Sink()) == digest
    if bins.crane == standins.path("crane"):
        assert standins.calls("crane")[-1]["argv"] == ["copy", base_image, dst, "--insecure"]
    with pytest.raises(NotFound) as missing:
        await tc.copy(f"{registry.host}/nope:1", dst, Sink())
    assert "does not exist" in missing.value.message
    with pytest.raises(UpstreamUnauthorized) as refused:
        await tc.copy(base_image, f"{auth_registry.host}/bk:1", Sink())
    assert refused.value.registry == auth_registry.host


async def test_start_cleans_up_after_a_crashed_daemons_buildkitd(
    standins: Standins, toolchain_factory: Any
) -> None:
    """A daemon that died left its buildkitd running (pidfile still there): the next start kills
    it through the sandbox's cleanup_buildkitd before starting its own."""
    import subprocess

    from agent.sandbox import cleanup_buildkitd

    bins = BuildkitBinaries(
        standins.path("buildkitd"), standins.path("buildctl"), standins.path("crane")
    )
    tc = toolchain_factory(bins, cleanup=cleanup_buildkitd)
    tc.run_dir.mkdir(parents=True)
    old_sock = tc.run_dir / "old.sock"
    leftover = subprocess.Popen(  # noqa: ASYNC220  (a stand-alone "previous" buildkitd)
        [bins.buildkitd, "--root", str(tc.root), "--addr", f"unix://{old_sock}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        tc.pidfile.write_text(f"{leftover.pid}\n")
        await tc.start()
        assert await asyncio.to_thread(leftover.wait, 10) == -signal.SIGKILL
        assert tc.state == "RUNNING" and tc.supervisor.pid != leftover.pid
        assert tc.pidfile.read_text().strip() == str(tc.supervisor.pid)
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def test_cache_repo_is_on_the_build_route_alone() -> None:
    """build.cache_repo is written through the build's own capability route, pinned to the cache
    tag; static routes have nothing to do with it (a RUN step has no capability)."""
    from agent.config import ProxyConfig, RouteConfig
    from agent.contracts import RouteTarget
    from agent.proxy._routes import Router, denial

    router = Router(ProxyConfig(routes=[RouteConfig("ws", "registry.example.com/team", "push")]))
    route = router.add_build(
        "localhost:8080",
        RouteTarget("registry.example.com/team/base", tag="k1", push=True),
        RouteTarget("registry.example.com/team/ws"),
        RouteTarget("registry.example.com/team/cache", tag="cache-1", push=True),
    )
    assert route.cache == "localhost:8080/b/registry.example.com/team/cache"
    assert route.login is not None
    cap = route.login.password
    name = "b/registry.example.com/team/cache"
    put = router.resolve(f"{name}/manifests/cache-1", None, cap)
    assert put is not None and denial(put, "PUT") is None
    other = router.resolve(f"{name}/manifests/latest", None, cap)
    assert other is not None and denial(other, "PUT") == (
        "manifest writes through this route are pinned to its tag"
    )
    upload = router.resolve(f"{name}/blobs/uploads/", None, cap)
    assert upload is not None and denial(upload, "POST") is None
    assert router.resolve(f"{name}/manifests/cache-1", None, None) is None  # no capability
    assert router.resolve(f"{name}/manifests/cache-1", None, "0" * 32) is None
    # The cache may share the base repository: both tags are writable there, nothing else.
    shared = router.add_build(
        "localhost:8080",
        RouteTarget("registry.example.com/team/base", tag="k2", push=True),
        RouteTarget("registry.example.com/team/ws"),
        RouteTarget("registry.example.com/team/base", tag="cache-2", push=True),
    )
    assert shared.login is not None
    for tag, allowed in (("k2", True), ("cache-2", True), ("k1", False)):
        res = router.resolve(f"b/registry.example.com/team/base/manifests/{tag}", None,
                             shared.login.password)  # fmt: skip
        assert res is not None and (denial(res, "PUT") is None) is allowed
    router.remove_build(route)
    assert router.resolve(f"{name}/manifests/cache-1", None, cap) is None


def test_build_argv_with_registry_cache(short_tmp: Path, standins: Standins) -> None:
    bins = BuildkitBinaries(
        standins.path("buildkitd"), standins.path("buildctl"), standins.path("crane")
    )
    tc = BuildkitToolchain(
        **_dirs(short_tmp),
        registry=CollectorRegistry(),
        sandbox=OffSandbox(),
        proxy=DirectPort("localhost:8080"),
        binaries=bins,
        cleanup=lambda pidfile, root: None,
    )
    spec = BuildSpec(context_fd=7, dockerfile="sub/Dockerfile", push_ref="localhost:8080/x:1",
                     no_cache=True)  # fmt: skip
    assert "--export-cache" not in tc.build_argv(spec, "/m.json")
    spec = dataclasses.replace(spec, cache_ref="localhost:8080/cache/c:buildcache")
    argv = tc.build_argv(spec, "/m.json")
    assert "--opt" in argv and "filename=sub/Dockerfile" in argv and "--no-cache" in argv
    at = argv.index("--export-cache")
    assert argv[at : at + 4] == [
        "--export-cache", "type=registry,ref=localhost:8080/cache/c:buildcache,mode=max",
        "--import-cache", "type=registry,ref=localhost:8080/cache/c:buildcache",
    ]  # fmt: skip
