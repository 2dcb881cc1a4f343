"""Credentials: Docker config.json forms, host matching, credential helpers (a real executable
speaking the helper protocol), re-reading on change and on reload(), and a broken file."""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

import pytest

from agent.config import CredentialConfig
from agent.errors import ConfigError, UpstreamUnauthorized
from agent.proxy._credentials import CredentialStore
from tests.infra.proxy_harness import (
    PASSWORD,
    USER,
    ProxyFactory,
    htpasswd_registry,
    make_proxy,
    team_proxy,
    write_docker_config,
)
from tests.infra.registry import Registry

__all__ = ["htpasswd_registry", "make_proxy"]  # fixtures


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_helper(bindir: Path, name: str, body: str) -> Path:
    """A ``docker-credential-<name>`` that speaks the protocol: server URL on stdin, JSON out."""
    bindir.mkdir(exist_ok=True)
    path = bindir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def helper_path(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = short_tmp / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return bindir


async def test_config_forms_and_host_matching(short_tmp: Path) -> None:
    cfg = write_docker_config(
        short_tmp / "config.json",
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": b64("hub:hubpw")},
                "registry.example.com:443": {"username": "u", "password": "p1"},
                "http://other.example:5000": {"identitytoken": "idt"},
                "empty.example": {},
            }
        },
    )
    store = CredentialStore(
        str(cfg), [CredentialConfig("inline.example", "i", "ipw")], helper_timeout=1
    )
    for hub in ("docker.io", "index.docker.io", "registry-1.docker.io", "docker.io:443"):
        cred = await store.get(hub)
        assert cred is not None and (cred.username, cred.password) == ("hub", "hubpw")
    cred = await store.get("registry.example.com")
    assert cred is not None and cred.password == "p1"
    cred = await store.get("other.example:5000")
    assert cred is not None and cred.identity_token == "idt"
    assert await store.get("other.example") is None
    assert await store.get("empty.example") is None
    cred = await store.get("inline.example")
    assert cred is not None and cred.password == "ipw"
    assert "hubpw" not in repr(cred)
    assert {"hubpw", "p1", "idt", "ipw", b64("hub:hubpw")} <= store.secrets()


async def test_credential_helper_protocol(short_tmp: Path, helper_path: Path) -> None:
    calls = short_tmp / "calls"
    write_helper(
        helper_path,
        "test",
        f"""read server
echo "$1 $server" >> {calls}
case "$server" in
  reg.example) printf '{{"ServerURL":"%s","Username":"hu","Secret":"hsecret"}}' "$server" ;;
  https://index.docker.io/v1/) printf '{{"Username":"<token>","Secret":"hub-idt"}}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
""",
    )
    cfg = write_docker_config(
        short_tmp / "config.json", {"credHelpers": {"reg.example": "test"}, "credsStore": "test"}
    )
    store = CredentialStore(str(cfg), [], helper_timeout=5)
    cred = await store.get("reg.example")
    assert cred is not None and (cred.username, cred.password) == ("hu", "hsecret")
    assert await store.get("reg.example") == cred  # cached: the helper ran once
    hub = await store.get("docker.io")
    assert hub is not None and hub.identity_token == "hub-idt"
    assert await store.get("unknown.example") is None  # "not found" means anonymous
    assert calls.read_text().splitlines() == [
        "get reg.example",
        "get https://index.docker.io/v1/",
        "get unknown.example",
    ]
    assert "hsecret" in store.secrets()


async def test_missing_and_failing_helpers_are_clear(short_tmp: Path, helper_path: Path) -> None:
    write_helper(helper_path, "broken", "echo 'keychain locked' >&2; exit 3\n")
    cfg = write_docker_config(
        short_tmp / "config.json",
        {"credHelpers": {"a.example": "nope-not-installed", "b.example": "broken"}},
    )
    store = CredentialStore(str(cfg), [], helper_timeout=5)
    with pytest.raises(UpstreamUnauthorized) as exc:
        await store.get("a.example")
    assert "docker-credential-nope-not-installed" in exc.value.message
    assert "not on PATH" in exc.value.message
    with pytest.raises(UpstreamUnauthorized) as exc:
        await store.get("b.example")
    assert "exit 3" in exc.value.message and "keychain locked" in exc.value.message


async def test_failing_helper_output_never_reaches_the_error(
    short_tmp: Path, helper_path: Path
) -> None:
    secret = "hunter2-helper-secret"
    reply = json.dumps({"ServerURL": "c.example", "Username": "u", "Secret": secret})
    write_helper(helper_path, "leaky", f"echo '{reply}'; echo '{reply}' >&2; exit 1\n")
    cfg = write_docker_config(short_tmp / "config.json", {"credHelpers": {"c.example": "leaky"}})
    store = CredentialStore(str(cfg), [], helper_timeout=5)
    with pytest.raises(UpstreamUnauthorized) as exc:
        await store.get("c.example")
    assert "exit 1" in exc.value.message and "withheld" in exc.value.message
    assert secret not in exc.value.message and secret not in str(exc.value.details)


async def test_hanging_helper_times_out_and_is_killed(short_tmp: Path, helper_path: Path) -> None:
    pidfile = short_tmp / "helper.pid"
    write_helper(helper_path, "hang", f"echo $$ > {pidfile}\nexec sleep 60\n")
    cfg = write_docker_config(short_tmp / "config.json", {"credHelpers": {"h.example": "hang"}})
    store = CredentialStore(str(cfg), [], helper_timeout=0.5)
    with pytest.raises(UpstreamUnauthorized) as exc:
        await store.get("h.example")
    assert "did not answer within 0.5s" in exc.value.message
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_helper_credentials_through_the_proxy(
    make_proxy: ProxyFactory, htpasswd_registry: Registry, short_tmp: Path, helper_path: Path
) -> None:
    reg = htpasswd_registry
    write_helper(helper_path, "ok", f"""printf '{{"Username":"{USER}","Secret":"{PASSWORD}"}}'\n""")
    cfg = write_docker_config(
        short_tmp / "config.json",
        {"credHelpers": {reg.host: "ok", "missing.example": "absent"}},
    )
    h = await make_proxy(
        http_hosts=[reg.host, "missing.example"],
        routes=[("ws", f"{reg.host}/team", "push"), ("gone", "missing.example/x", "pull")],
        docker_config=cfg,
    )
    async with h.session() as s:
        async with s.get(f"{h.url}/v2/ws/x/tags/list") as r:
            assert r.status == 404  # authenticated: the repository simply does not exist
        h.proxy.auth._challenges["missing.example"] = h.proxy.auth._challenges[reg.host]
        async with s.get(f"{h.url}/v2/gone/y/tags/list") as r:
            assert r.status == 401
            message = (await r.json())["errors"][0]["message"]
    assert "docker-credential-absent" in message


async def test_file_change_and_reload_and_broken_file(
    make_proxy: ProxyFactory,
    htpasswd_registry: Registry,
    short_tmp: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = htpasswd_registry
    path = short_tmp / "config.json"
    write_docker_config(path, {"auths": {reg.host: {"auth": b64(f"{USER}:wrong")}}})
    h = await team_proxy(make_proxy, reg.host, docker_config=path)
    url = f"{h.url}/v2/ws/x/tags/list"
    async with h.session() as s:
        async with s.get(url) as r:
            assert r.status == 401
        # Changed on disk: picked up on use (the stat is rate-limited; let this one through).
        write_docker_config(path, {"auths": {reg.host: {"auth": b64(f"{USER}:{PASSWORD}")}}})
        h.proxy.credentials._checked = 0.0
        async with s.get(url) as r:
            assert r.status == 404
        # A broken file keeps the credentials already loaded, and says why.
        caplog.set_level(logging.WARNING, logger="agent.proxy")
        path.write_text('{"auths": {')
        with pytest.raises(ConfigError, match="previous credentials stay in use"):
            h.proxy.reload()
        assert "keeping the previous credentials" in caplog.text
        async with s.get(url) as r:
            assert r.status == 404
        # reload() (SIGHUP) takes a good file at once.
        write_docker_config(path, {"auths": {}})
        h.proxy.reload()
        async with s.get(url) as r:
            assert r.status == 401
    assert PASSWORD not in caplog.text
    assert json.dumps(b64(f"{USER}:{PASSWORD}")) not in caplog.text
