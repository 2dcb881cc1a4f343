"""Upstream authentication against real registries: htpasswd (Basic) and token auth (Bearer,
with the tests' token server), the token cache, key rotation, and no credential in any log."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from tests.infra.proxy_harness import (
    PASSWORD,
    USER,
    ProxyFactory,
    htpasswd_registry,
    make_proxy,
    push_blob,
    push_image,
    run,
    skopeo_env,
    team_proxy,
    token_registry,
    write_docker_config,
)
from tests.infra.registry import Registry
from tests.infra.token_server import TokenRegistry, start_token_registry

__all__ = ["htpasswd_registry", "make_proxy", "token_registry"]  # fixtures

TLS = ("--src-tls-verify=false", "--dest-tls-verify=false")
FETCHED = "build_agent_proxy_token_fetches_total"
OCI = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def auth_entry(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_basic_auth_with_inline_credentials(
    make_proxy: ProxyFactory, htpasswd_registry: Registry
) -> None:
    reg = htpasswd_registry
    h = await team_proxy(make_proxy, reg.host, login=True)
    async with h.session() as s:
        digest, _ = await push_image(s, h.url, "ws/basic", "v1", os.urandom(2000))
    assert await h.proxy.manifest_digest(f"{reg.host}/team/basic:v1") == digest


async def test_basic_auth_refused_without_credentials(
    make_proxy: ProxyFactory, htpasswd_registry: Registry
) -> None:
    reg = htpasswd_registry
    h = await team_proxy(make_proxy, reg.host)
    async with h.session() as s, s.get(f"{h.url}/v2/ws/x/tags/list") as r:
        assert r.status == 401
        # The registry's challenge is not passed on: clients must not go around the proxy.
        assert "WWW-Authenticate" not in r.headers
        assert (await r.json())["errors"][0]["code"] == "UNAUTHORIZED"


async def test_token_auth_push_with_docker_config_leaks_nothing(
    make_proxy: ProxyFactory,
    token_registry: TokenRegistry,
    base_image: str,
    short_tmp: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = token_registry
    cfg = write_docker_config(short_tmp / "config.json", {"auths": {reg.host: auth_entry()}})
    caplog.set_level(logging.DEBUG)  # every logger, every level
    issued_before = len(reg.tokens.issued)
    h = await team_proxy(make_proxy, reg.host, docker_config=cfg)
    env = skopeo_env(short_tmp)
    dst = f"docker://{h.proxy.host_address}/ws/leak-check:1"
    copy = ("skopeo", "--debug", "copy", *TLS, "--dest-creds", h.creds)
    res = await run(*copy, f"docker://{base_image}", dst, env=env)
    assert res.rc == 0, res.err
    res = await run("skopeo", "inspect", "--tls-verify=false", "--creds", h.creds, dst, env=env)
    assert res.rc == 0, res.err
    tokens = reg.tokens.issued[issued_before:]
    assert tokens, "the push went through the token server"
    assert {f.account for f in reg.tokens.fetches[-len(tokens) :]} == {USER}
    secrets = [PASSWORD, auth_entry()["auth"], *tokens]
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records) + caplog.text
    exposed = generate_latest(h.app.registry).decode()
    for secret in secrets:
        assert secret not in logged
        assert secret not in exposed
        assert secret not in res.err  # the client never sees one either
        assert h.proxy.scrub(f"x {secret} y") == "x *** y"
    assert any(r.name == "agent.proxy" for r in caplog.records)


async def test_token_cache_one_fetch_then_refresh_on_expiry(
    make_proxy: ProxyFactory, token_registry: TokenRegistry, short_tmp: Path
) -> None:
    reg = token_registry
    h = await team_proxy(make_proxy, reg.host, login=True)
    async with h.session() as s:
        await push_image(s, h.url, "ws/cache", "v1", os.urandom(500))
        pulls_before = h.metric(FETCHED, result="ok")
        for _ in range(10):
            async with s.head(f"{h.url}/v2/ws/cache/manifests/v1", headers=OCI) as r:
                assert r.status == 200
        # The push's token carried pull,push; the first HEAD needs a pull-only scope set.
        assert h.metric(FETCHED, result="ok") - pulls_before <= 1
        fetched = h.metric(FETCHED, result="ok")
        for _ in range(10):
            async with s.head(f"{h.url}/v2/ws/cache/manifests/v1", headers=OCI) as r:
                assert r.status == 200
        assert h.metric(FETCHED, result="ok") == fetched
        # Past expires_in (300 s from the token server): exactly one new fetch.
        real = h.proxy.auth.clock
        h.proxy.auth.clock = lambda: real() + 301
        for _ in range(5):
            async with s.head(f"{h.url}/v2/ws/cache/manifests/v1", headers=OCI) as r:
                assert r.status == 200
        assert h.metric(FETCHED, result="ok") == fetched + 1


async def test_anonymous_token_for_pulls(
    make_proxy: ProxyFactory, token_registry: TokenRegistry
) -> None:
    reg = token_registry
    owner = await team_proxy(make_proxy, reg.host, login=True)
    async with owner.session() as s:
        digest, _ = await push_image(s, owner.url, "ws/public", "v1", os.urandom(300))
    anon = await team_proxy(make_proxy, reg.host)
    assert await anon.proxy.manifest_digest(f"{reg.host}/team/public:v1") == digest
    assert reg.tokens.fetches[-1].grant == "anonymous"
    url = f"{anon.url}/v2/ws/public/blobs/uploads/"
    async with anon.session() as s, s.post(url) as r:
        assert r.status == 401  # the anonymous token carries no push
        assert "WWW-Authenticate" not in r.headers


async def test_identity_token_uses_refresh_grant(
    make_proxy: ProxyFactory, token_registry: TokenRegistry, short_tmp: Path
) -> None:
    reg = token_registry
    reg.tokens.identity_tokens["idt-9f8e7d6c5b4a"] = USER
    cfg = write_docker_config(
        short_tmp / "config.json",
        {"auths": {f"https://{reg.host}": {"identitytoken": "idt-9f8e7d6c5b4a"}}},
    )
    h = await team_proxy(make_proxy, reg.host, docker_config=cfg)
    async with h.session() as s:
        await push_blob(s, h.url, "ws/idtoken", os.urandom(100))
    assert reg.tokens.fetches[-1].grant == "refresh_token"
    assert reg.tokens.fetches[-1].account == USER


async def test_key_rotation_costs_exactly_one_retry(
    make_proxy: ProxyFactory, short_tmp: Path
) -> None:
    tr = start_token_registry(short_tmp / "rot", {USER: PASSWORD})
    try:
        h = await team_proxy(make_proxy, tr.host, login=True)
        async with h.session() as s:
            await push_image(s, h.url, "ws/rot", "v1", os.urandom(100))
            url = f"{h.url}/v2/ws/rot/manifests/v1"
            async with s.head(url, headers=OCI) as r:
                assert r.status == 200
            fetched = h.metric(FETCHED, result="ok")
            tr.rotate_key()  # the cached token is now signed by a key the registry distrusts
            log_before = tr.registry.log().count('"HEAD /v2/team/rot/manifests/v1 ')
            async with s.head(url, headers=OCI) as r:
                assert r.status == 200
            heads = tr.registry.log().count('"HEAD /v2/team/rot/manifests/v1 ') - log_before
            assert heads == 2  # the 401 and the one retry
            assert h.metric(FETCHED, result="ok") == fetched + 1
            # A manifest PUT carries a body, small enough to hold and send again after a 401.
            async with s.get(url, headers=OCI) as r:
                manifest = await r.read()
            tr.rotate_key()
            puts = tr.registry.log().count('"PUT /v2/team/rot/manifests/v2 ')
            async with s.put(
                f"{h.url}/v2/ws/rot/manifests/v2",
                data=manifest,
                headers={"Content-Type": OCI["Accept"]},
            ) as r:
                assert r.status == 201, await r.text()
            assert tr.registry.log().count('"PUT /v2/team/rot/manifests/v2 ') - puts == 2
    finally:
        tr.stop()


async def test_wrong_password_is_a_clear_401(
    make_proxy: ProxyFactory, token_registry: TokenRegistry
) -> None:
    reg = token_registry
    h = await team_proxy(make_proxy, reg.host, credentials=[(reg.host, USER, "not-the-password")])
    async with h.session() as s, s.get(f"{h.url}/v2/ws/x/tags/list") as r:
        assert r.status == 401
        message = (await r.json())["errors"][0]["message"]
    assert reg.host in message and "refused" in message
    assert "not-the-password" not in message
    assert h.metric(FETCHED, result="unauthorized") == 1


async def test_cross_repo_mount_token_carries_both_scopes(
    make_proxy: ProxyFactory, token_registry: TokenRegistry
) -> None:
    reg = token_registry
    h = await team_proxy(make_proxy, reg.host, login=True)
    async with h.session() as s:
        digest = await push_blob(s, h.url, "ws/mnt-src", os.urandom(4000))
        async with s.post(
            f"{h.url}/v2/ws/mnt-dst/blobs/uploads/",
            params={"mount": digest, "from": "ws/mnt-src"},
        ) as r:
            assert r.status == 201, await r.text()
    assert sorted(reg.tokens.fetches[-1].scopes) == [
        "repository:team/mnt-dst:pull,push",
        "repository:team/mnt-src:pull",
    ]
    log = reg.registry.log()
    assert '"POST /v2/team/mnt-dst/blobs/uploads/?mount=' in log
    assert '"PATCH /v2/team/mnt-dst/' not in log
