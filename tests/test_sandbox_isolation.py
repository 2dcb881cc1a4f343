"""The sandbox from a child's point of view, children started the way the daemon starts them
(agent/build/child.py spawn): only the proxy is reachable, secrets are hidden, no other process is
visible, and a killed child leaves no process or mount behind. Root; the only namespaces touched
are the ones these tests create."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from agent import config as config_mod
from agent.build import child as children
from agent.errors import StartupError
from agent.runtime import App
from agent.sandbox import Sandbox, _egress, _netns, hide_plan, open_sandbox
from agent.sandbox._sandbox import Sandbox as SandboxImpl
from tests.infra.registry import Registry, free_port
from tests.infra.sandbox_env import (
    connect_argv,
    left_behind,
    make_app,
    markers_of,
    mountinfo,
    pid1_of,
    poll,
    processes_matching,
    results,
    run_child,
    sh,
    snapshot,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")


@pytest.fixture
async def sandbox(short_tmp: Path) -> AsyncIterator[tuple[Sandbox, App]]:
    app = make_app(short_tmp)
    async with open_sandbox(app) as sb:
        assert isinstance(sb, Sandbox)
        yield sb, app
    assert not _netns.exists(app.config.sandbox.netns)


@contextlib.asynccontextmanager
async def http_server(sock: socket.socket, text: str) -> AsyncIterator[None]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=text)

    webapp = web.Application()
    webapp.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(webapp)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def test_child_reaches_the_proxy_listener_and_nothing_on_host_loopback(
    sandbox: tuple[Sandbox, App], short_tmp: Path, registry: Registry
) -> None:
    sb, _ = sandbox
    proxy_port = free_port()
    host_sock = socket.socket()
    host_sock.bind(("127.0.0.1", 0))
    host_sock.listen()
    host_port = host_sock.getsockname()[1]
    async with (
        http_server(sb.listen(proxy_port), "proxy"),
        http_server(host_sock, "host service"),
    ):
        code, out = await run_child(
            sb,
            connect_argv(
                f"localhost:{proxy_port}",
                f"127.0.0.1:{host_port}",
                f"127.0.0.1:{registry.port}",
            ),
            short_tmp / "home",
        )
        # Control: from the host the same services answer, and the proxy port is free there.
        proc = await asyncio.create_subprocess_exec(
            *connect_argv(f"127.0.0.1:{host_port}", f"127.0.0.1:{registry.port}"),
            stdout=asyncio.subprocess.PIPE,
        )
        host_view = (await proc.communicate())[0].decode()
    assert code == 0, out
    r = results(out)
    assert r[f"localhost:{proxy_port}"] == "OK", out
    assert r[f"127.0.0.1:{host_port}"] == "FAIL", out
    assert r[f"127.0.0.1:{registry.port}"] == "FAIL", out
    assert set(results(host_view).values()) == {"OK"}, host_view
    # The proxy's socket is not on the host's loopback.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", proxy_port)) != 0


async def test_config_dir_credentials_records_and_runtime_dir_are_hidden(
    sandbox: tuple[Sandbox, App], short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb, app = sandbox
    cfg = app.config
    monkeypatch.setenv("AGENT_PROXY_CREDENTIALS", '[{"host":"r","password":"hunter2-env"}]')
    monkeypatch.setenv("REGISTRY_PASSWORD", "hunter2-env")
    state, run = Path(cfg.daemon.state_dir), Path(cfg.daemon.runtime_dir)
    (state / "builds" / "b1.json").write_text('{"secret": "record"}')
    (state / "buildah").mkdir(exist_ok=True)
    (state / "buildah" / "visible").write_text("storage")
    (run / "daemon.pid").write_text("1")
    (run / "children" / "registries.conf").write_text("conf")
    etc = Path(cfg.build.docker_config).parent
    script = (
        f"ls -A {etc}; echo END-ETC; cat {cfg.build.docker_config} {cfg.source}; "
        f"echo END-CAT; ls -A {run}; echo END-RUN; cat {run}/children/registries.conf; echo; "
        f"ls -A {state}/builds; echo END-BUILDS; cat {state}/buildah/visible; echo; "
        "env; echo END-ENV; touch "
        f"{etc}/planted 2>&1 || echo WRITE-REFUSED"
    )
    code, out = await run_child(sb, ["sh", "-c", script], short_tmp / "home")
    etc_list, rest = out.split("END-ETC\n")
    cat, rest = rest.split("END-CAT\n")
    run_list, rest = rest.split("END-RUN\n")
    conf, rest = rest.split("\n", 1)
    builds, rest = rest.split("END-BUILDS\n")
    storage, rest = rest.split("\n", 1)
    env, rest = rest.split("END-ENV\n")
    assert etc_list.strip() == ""  # the config directory reads as empty
    assert "c2VjcmV0" not in cat and "auths" not in cat and "sandbox" not in cat, cat
    assert run_list.split() == ["buildkit", "children"]  # no pid file, no control socket dir
    assert conf == "conf"
    assert builds.strip() == ""
    assert storage == "storage"
    assert "hunter2" not in env and "AGENT_" not in env, env
    assert "WRITE-REFUSED" in rest
    assert not (etc / "planted").exists()
    assert code == 0


async def test_child_sees_no_other_process_of_the_host(
    sandbox: tuple[Sandbox, App], short_tmp: Path
) -> None:
    sb, _ = sandbox
    cap = "b/" + secrets.token_hex(8)
    # Another build's child whose command line carries its route capability.
    other = await children.spawn(
        "other",
        ["sh", "-c", f"sleep 300; : push localhost:1/{cap}/target"],
        sandbox=sb,
        env=children.child_env(short_tmp / "home"),
    )
    try:
        assert await poll(lambda: bool(processes_matching(cap))), (
            "control: the other child's command line is on the host"
        )
        code, out = await run_child(
            sb,
            ["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '; echo; ls /proc"],
            short_tmp / "home",
        )
    finally:
        await other.stop(grace=0)
    assert code == 0
    assert cap not in out
    pids = [p for p in out.split() if p.isdigit()]
    assert str(os.getpid()) not in pids or len(pids) < 5, out  # only its own few processes
    assert len(pids) < 5, out


@pytest.mark.parametrize("victim", ["wrapper", "pid1"])
async def test_sigkill_leaves_no_process_and_no_mount(
    sandbox: tuple[Sandbox, App], short_tmp: Path, victim: str
) -> None:
    sb, _ = sandbox
    marker = f"30{secrets.randbelow(10**6)}"
    mnt = short_tmp / "state" / "buildkit" / "mnt"
    mnt.mkdir(parents=True)
    child = await children.spawn(
        "buildkitd-like",
        ["sh", "-c", f"mount -t tmpfs none {mnt} && sleep {marker}.1 & sleep {marker}.2"],
        sandbox=sb,
        env=children.child_env(short_tmp / "home"),
        pid_namespace=True,
    )
    assert await poll(lambda: len(processes_matching(f"sleep {marker}", start=True)) == 2)
    inner = processes_matching(f"sleep {marker}", start=True)
    assert len(inner) == 2
    mnt_ns = {os.stat(f"/proc/{p}/ns/mnt").st_ino for p in inner}
    assert os.stat("/proc/self/ns/mnt").st_ino not in mnt_ns
    assert str(mnt) not in mountinfo()  # never seen by the host
    target = child.pid if victim == "wrapper" else pid1_of(inner[0])
    os.kill(target, signal.SIGKILL)
    code = await asyncio.wait_for(child.wait(), 10)
    assert code == -signal.SIGKILL
    assert await poll(lambda: not processes_matching(f"sleep {marker}", start=True))
    holders = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry.name}/ns/mnt").st_ino in mnt_ns:
                    holders.append(entry.name)
    assert holders == []  # the mount namespace, and the tmpfs in it, are gone
    assert str(mnt) not in mountinfo()


async def test_stop_ends_a_tree_whose_pid1_ignores_sigterm(
    sandbox: tuple[Sandbox, App], short_tmp: Path
) -> None:
    sb, _ = sandbox
    marker = f"31{secrets.randbelow(10**6)}"
    child = await children.spawn(
        "t",
        ["sh", "-c", f"sleep {marker}.1 & sleep {marker}.2"],
        sandbox=sb,
        env=children.child_env(short_tmp / "home"),
    )
    assert await poll(lambda: len(processes_matching(f"sleep {marker}", start=True)) == 2)
    started = time.monotonic()
    code = await child.stop(grace=30)
    # sh as PID 1 has no SIGTERM handler, so the kernel would drop it; the wrapper ends the
    # namespace instead of leaving the caller to wait out the grace period.
    assert time.monotonic() - started < 10
    assert code != 0
    assert processes_matching(f"sleep {marker}", start=True) == []


def start_orphan(netns: str, duration: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", netns, "sleep", duration])


async def test_leftovers_of_a_crashed_daemon_are_replaced_once(short_tmp: Path) -> None:
    app = make_app(short_tmp, egress="nat")
    name = app.config.sandbox.netns
    host_if = _egress.host_if_name(name)
    marker = f"32{secrets.randbelow(10**6)}"
    sh("ip", "netns", "add", name)
    # Held open so the old namespace's inode cannot be reused by the new one (it was, once).
    old_fd = os.open(_netns.path(name), os.O_RDONLY)
    old_ino = os.fstat(old_fd).st_ino
    orphan = start_orphan(name, f"{marker}.5")
    sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", f"{host_if}p")
    sh("nft", "add", "table", "inet", _egress.table_name(name))
    try:
        async with open_sandbox(app) as sb:
            assert isinstance(sb, Sandbox)
            assert orphan.wait(10) == -signal.SIGKILL
            assert os.stat(_netns.path(name)).st_ino != old_ino
            netns_list = sh("ip", "netns")
            assert [ln.split()[0] for ln in netns_list.splitlines()].count(name) == 1
            links = sh("ip", "-o", "link")
            assert links.count(f" {host_if}@") == 1 and f"{host_if}p" not in links
            tables = sh("nft", "list", "tables")
            assert tables.count(_egress.table_name(name)) == 1
            assert sb.state == "on"
    finally:
        os.close(old_fd)
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        sh("ip", "link", "del", host_if, check=False)
        sh("nft", "delete", "table", "inet", _egress.table_name(name), check=False)
        sh("ip", "netns", "del", name, check=False)
    assert not _netns.exists(name)
    assert not _egress.link_exists(name) and not _egress.table_exists(name)


async def test_running_everything_twice_leaves_nothing_behind(short_tmp: Path) -> None:
    before = snapshot()
    markers = [str(short_tmp)]
    for i in range(2):
        tmp = short_tmp / str(i)
        app = make_app(tmp, egress="nat")
        markers += markers_of(app)
        async with open_sandbox(app) as sb:
            mnt = tmp / "state" / "m"
            mnt.mkdir()
            code, out = await run_child(
                sb, ["sh", "-c", f"mount -t tmpfs none {mnt} && echo mounted"], tmp / "home"
            )
            assert (code, out.strip()) == (0, "mounted")
            sock = sb.listen(free_port())
            sock.close()
    assert left_behind(before, snapshot(), markers) == []


def test_refused_privileges_are_a_startup_error_naming_the_fix(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(short_tmp)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    async def start() -> None:
        async with open_sandbox(app):
            pass

    with pytest.raises(StartupError, match=r"root.*sandbox.mode = \"off\""):
        asyncio.run(start())
    assert not _netns.exists(app.config.sandbox.netns)


async def test_a_namespace_the_kernel_refuses_fails_the_probe(short_tmp: Path) -> None:
    app = make_app(short_tmp)
    sb = SandboxImpl("ba-test-missing", hide_plan(app.config), None)  # never created
    with pytest.raises(StartupError, match=r"open network namespace .*ba-test-missing"):
        await sb.probe()


async def test_off_mode_is_loud(short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(short_tmp, mode="off")
    with caplog.at_level(logging.WARNING, logger="agent.sandbox"):
        async with open_sandbox(app) as sb:
            assert sb.mode == "off"
            assert sb.state == "off"
            assert sb.wrap(["true"]) == ["true"]
    assert any('sandbox.mode = "off"' in r.getMessage() for r in caplog.records)


def test_hiding_rule_falls_back_to_files_in_shared_directories(tmp_path: Path) -> None:
    # The config file sits beside the state dir: hiding its directory would hide the toolchain's
    # storage, so only the file is hidden, with a warning.
    (tmp_path / "config.toml").write_text(
        f'[daemon]\nstate_dir = "{tmp_path}/state"\nruntime_dir = "{tmp_path}/run"\n'
        f'socket = "{tmp_path}/run/agent.sock"\n'
        '[build]\ndocker_config = "/etc/docker-config.json"\n'
    )
    cfg = config_mod.load(tmp_path / "config.toml", {})
    plan = hide_plan(cfg)
    assert str(tmp_path) not in plan.dirs and "/etc" not in plan.dirs
    assert str(tmp_path / "config.toml") in plan.files
    assert "/etc/docker-config.json" in plan.files
    assert str(tmp_path / "run") in plan.dirs  # the socket is covered by the runtime dir
    assert str(tmp_path / "state" / "builds") in plan.dirs
    assert len(plan.warnings) == 2
    bad = config_mod.load(None, {"AGENT_DAEMON_RUNTIME_DIR": "/run"})
    with pytest.raises(StartupError, match="runtime_dir"):
        hide_plan(bad)


async def test_a_nat_subnet_already_in_use_is_refused(short_tmp: Path) -> None:
    first = make_app(short_tmp / "a", egress="nat")
    subnet = first.config.sandbox.nat_subnet
    second = make_app(short_tmp / "b", egress="nat", nat_subnet=subnet)
    async with open_sandbox(first):
        with pytest.raises(StartupError, match=r"nat_subnet .* overlaps the host's ba-"):
            async with open_sandbox(second):
                pass
        assert not _netns.exists(second.config.sandbox.netns)
        assert not _egress.link_exists(second.config.sandbox.netns)


async def test_children_lose_capabilities_no_builder_needs(
    sandbox: tuple[Sandbox, App], short_tmp: Path
) -> None:
    sb, _ = sandbox
    code, out = await run_child(sb, ["grep", "CapBnd", "/proc/self/status"], short_tmp / "home")
    assert code == 0, out
    child = int(out.split()[1], 16)
    host = int(own_status("CapBnd"), 16)
    for cap in (16, 22, 25):  # sys_module, sys_boot, sys_time
        assert host & (1 << cap), "control: the test runs with the capability"
        assert not child & (1 << cap), out
    assert child & (1 << 21)  # sys_admin stays: buildah and buildkitd mount


def own_status(field: str) -> str:
    """A field of this process's /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    return next(ln for ln in status.splitlines() if ln.startswith(field + ":")).split()[1]
