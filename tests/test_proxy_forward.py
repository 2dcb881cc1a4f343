"""Forwarding through the proxy to a real plain docker-registry: real clients (skopeo, buildah),
chunked uploads, ranges, mounts, routes, refusals and an upstream that goes away."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from agent.contracts import ProxyLogin, RouteTarget
from agent.errors import BadRequest, UpstreamUnavailable
from agent.proxy._routes import mirror_name
from tests.infra.images import buildah_cmd
from tests.infra.proxy_harness import (
    ProxyFactory,
    digest_of,
    make_proxy,
    push_blob,
    push_image,
    run,
    skopeo_env,
    team_proxy,
)
from tests.infra.registry import Registry, free_port, start_registry

__all__ = ["make_proxy"]  # fixture

TLS = ("--src-tls-verify=false", "--dest-tls-verify=false")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": f"Basic {ProxyLogin('', user, password).basic()}"}


ACCEPT = {
    "Accept": "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
}


def upstream_requests(reg: Registry, pattern: str) -> list[str]:
    """The registry's access-log lines (``"METHOD /uri HTTP/1.1" status``) matching a regex."""
    return [
        line
        for line in reg.log().splitlines()
        if line.startswith("127.0.0.1 - -") and re.search(pattern, line)
    ]


async def test_base_endpoint_answers_itself(make_proxy: ProxyFactory, registry: Registry) -> None:
    h = await make_proxy(http_hosts=[registry.host])
    async with h.session() as s, s.get(h.url + "/v2/") as r:
        assert r.status == 200  # the host listener's token
    async with aiohttp.ClientSession() as s:
        async with s.get(h.url + "/v2/") as r:
            # The ping challenges: a client holding a build's credential then sends it.
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Basic realm=")
            assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        route = h.proxy.add_build_route(base=None, target=RouteTarget(f"{registry.host}/x", "t"))
        assert route.login is not None
        auth = basic(route.login.username, route.login.password)
        async with s.get(h.url + "/v2/", headers=auth) as r:
            assert r.status == 200
        async with s.get(h.url + "/v2/", headers=basic("build-agent", "f" * 32)) as r:
            assert r.status == 401
        h.proxy.remove_build_route(route)
        async with s.get(h.url + "/v2/", headers=auth) as r:
            assert r.status == 401
        async with s.post(h.url + "/v2/") as r:
            assert r.status == 405
        async with s.get(h.url + "/nothing") as r:
            assert r.status == 404
            assert (await r.json())["errors"][0]["code"] == "NOT_FOUND"
    assert h.metric("build_agent_proxy_upstream_latency_seconds_count", method="GET") == 0


async def test_skopeo_copy_and_inspect_through_static_route(
    make_proxy: ProxyFactory, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    h = await team_proxy(make_proxy, registry.host)
    env = skopeo_env(short_tmp)
    dst = f"docker://{h.proxy.host_address}/ws/copied:1"
    res = await run(
        "skopeo", "copy", *TLS, "--dest-creds", h.creds, f"docker://{base_image}", dst, env=env
    )
    assert res.rc == 0, res.err
    res = await run("skopeo", "inspect", "--tls-verify=false", "--creds", h.creds, dst, env=env)
    assert res.rc == 0, res.err
    via_proxy = json.loads(res.out)
    res = await run(
        "skopeo",
        "inspect",
        "--tls-verify=false",
        f"docker://{registry.host}/team/copied:1",
        env=env,
    )
    assert res.rc == 0, res.err
    assert json.loads(res.out)["Digest"] == via_proxy["Digest"]
    assert "PATH=/bin" in via_proxy["Env"]
    assert h.metric("build_agent_proxy_bytes_total", direction="up") > 0
    assert (
        h.metric("build_agent_proxy_requests_total", route="static", method="PUT", status="2xx")
        >= 1
    )


async def test_buildah_push_and_pull_through_proxy(
    make_proxy: ProxyFactory, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    h = await team_proxy(make_proxy, registry.host)
    b = buildah_cmd(short_tmp / "buildah")
    env = skopeo_env(short_tmp)
    mirror = f"{h.proxy.child_address}/mirror/{mirror_name(registry.host)}/busybox:latest"
    try:
        res = await run(*b, "pull", "--tls-verify=false", f"docker://{mirror}", env=env)
        assert res.rc == 0, res.err
        image = res.out.strip().splitlines()[-1]
        # Static routes are the host listener's (build children do not see them).
        dest = f"docker://{h.proxy.host_address}/ws/buildah/out:2"
        creds = ("--tls-verify=false", "--creds", h.creds)
        res = await run(*b, "push", *creds, image, dest, env=env)
        assert res.rc == 0, res.err
        res = await run(*b, "rmi", "--all", "--force", env=env)
        assert res.rc == 0, res.err
        res = await run(*b, "pull", *creds, dest, env=env)
        assert res.rc == 0, res.err
    finally:
        await run(*b, "rmi", "--all", "--force", env=env)
    assert upstream_requests(registry, r'"PUT /v2/team/buildah/out/manifests/2 ')


async def test_multi_chunk_upload_and_range_get(
    make_proxy: ProxyFactory, registry: Registry
) -> None:
    h = await team_proxy(make_proxy, registry.host)
    data = os.urandom(3 * 65536 + 123)
    async with h.session() as s:
        digest = await push_blob(s, h.url, "ws/chunks", data, chunk=65536)
        async with s.get(f"{h.url}/v2/ws/chunks/blobs/{digest}") as r:
            assert r.status == 200
            assert await r.read() == data
            assert r.headers["Docker-Content-Digest"] == digest
        async with s.head(f"{h.url}/v2/ws/chunks/blobs/{digest}") as r:
            assert r.status == 200
            assert int(r.headers["Content-Length"]) == len(data)
        async with s.get(
            f"{h.url}/v2/ws/chunks/blobs/{digest}", headers={"Range": "bytes=1000-1999"}
        ) as r:
            assert r.status == 206
            assert r.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
            assert await r.read() == data[1000:2000]
    patches = upstream_requests(registry, r'"PATCH /v2/team/chunks/blobs/uploads/')
    assert len(patches) == 4  # four chunks went up as four PATCHes, not one buffered body


async def test_cross_repo_mount_reuploads_nothing(
    make_proxy: ProxyFactory, registry: Registry
) -> None:
    h = await team_proxy(make_proxy, registry.host)
    data = os.urandom(50_000)
    async with h.session() as s:
        digest = await push_blob(s, h.url, "ws/mount-src", data)
        up_before = h.metric("build_agent_proxy_bytes_total", direction="up")
        async with s.post(
            f"{h.url}/v2/ws/mount-dst/blobs/uploads/",
            params={"mount": digest, "from": "ws/mount-src"},
        ) as r:
            assert r.status == 201, await r.text()
            assert r.headers["Location"] == f"/v2/ws/mount-dst/blobs/{digest}"
        assert h.metric("build_agent_proxy_bytes_total", direction="up") == up_before
        async with s.get(f"{h.url}/v2/ws/mount-dst/blobs/{digest}") as r:
            assert await r.read() == data
        # An unknown source: the proxy drops the mount and the client uploads normally.
        async with s.post(
            f"{h.url}/v2/ws/mount-other/blobs/uploads/",
            params={"mount": digest, "from": "elsewhere/repo"},
        ) as r:
            assert r.status == 202
        # A refused mount (blob not in the source): the registry starts an upload instead.
        other = os.urandom(1000)
        async with s.post(
            f"{h.url}/v2/ws/mount-other/blobs/uploads/",
            params={"mount": digest_of(other), "from": "ws/mount-src"},
        ) as r:
            assert r.status == 202
            loc = r.headers["Location"]
        async with s.put(
            f"{h.url}{loc}&digest={digest_of(other)}",
            data=other,
            headers={"Content-Type": "application/octet-stream"},
        ) as r:
            assert r.status == 201, await r.text()
    mounts = upstream_requests(registry, r'"POST /v2/team/mount-dst/blobs/uploads/\?')
    assert len(mounts) == 1 and "from=team%2Fmount-src" in mounts[0] and '" 201 ' in mounts[0]
    assert not upstream_requests(registry, r'"(PATCH|PUT) /v2/team/mount-dst/blobs/uploads/')
    assert upstream_requests(registry, r'"POST /v2/team/mount-other/blobs/uploads/ HTTP')


async def test_build_route_pins_writes_and_vanishes(
    make_proxy: ProxyFactory,
    registry: Registry,
    base_image: str,
    short_tmp: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # the per-request debug line names every path
    h = await make_proxy(http_hosts=[registry.host])
    route = h.proxy.add_build_route(
        base=RouteTarget(repo=f"{registry.host}/busybox", tag="latest"),
        target=RouteTarget(repo=f"{registry.host}/built/ws", tag="t1", push=True),
    )
    host = mirror_name(registry.host)
    assert route.base == f"{h.proxy.child_address}/b/{host}/busybox"
    assert route.target == f"{h.proxy.child_address}/b/{host}/built/ws"
    login = route.login
    assert login is not None and login.address == h.proxy.child_address
    cap = login.password
    env = skopeo_env(short_tmp)
    authfile = short_tmp / "auth.json"
    authfile.write_text(login.docker_config())
    copy = ("skopeo", "copy", *TLS, f"docker://{route.base}:latest", f"docker://{route.target}:t1")
    # Without the credential the route is not there for skopeo (the path alone is no secret).
    res = await run(*copy, env=env)
    assert res.rc != 0 and "unauthorized" in res.err.lower(), res.err
    res = await run(copy[0], copy[1], "--authfile", str(authfile), *copy[2:], env=env)
    assert res.rc == 0, res.err
    base_url = f"{h.url}/v2/b/{host}"
    auth = basic(login.username, cap)
    async with aiohttp.ClientSession(headers=auth) as s:
        async with s.get(f"{base_url}/built/ws/manifests/t1", headers=ACCEPT) as r:
            assert r.status == 200
            manifest, ctype = await r.read(), r.headers["Content-Type"]
        for url in (f"{base_url}/built/ws/manifests/other", f"{base_url}/busybox/manifests/latest"):
            async with s.put(url, data=manifest, headers={"Content-Type": ctype}) as r:
                assert r.status == 403
                assert (await r.json())["errors"][0]["code"] == "DENIED"
        async with s.post(f"{base_url}/busybox/blobs/uploads/") as r:
            assert r.status == 403
        # crane's cross-repo mount: from= names the base route, the proxy names the repository.
        layer = json.loads(manifest)["layers"][0]["digest"]
        async with s.post(
            f"{base_url}/built/ws/blobs/uploads/",
            params={"mount": layer, "from": f"b/{host}/busybox"},
        ) as r:
            assert r.status == 201, await r.text()
            assert r.headers["Location"] == f"/v2/b/{host}/built/ws/blobs/{layer}"
        async with s.get(f"{base_url}/elsewhere/manifests/t1") as r:
            assert r.status == 404
    async with h.session() as s:
        for creds in ({}, basic("build-agent", "0" * 32)):
            async with s.get(f"{base_url}/built/ws/manifests/t1", headers=creds) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Basic ")
        h.proxy.remove_build_route(route)
        async with s.get(f"{base_url}/built/ws/manifests/t1", headers=auth) as r:
            assert r.status == 401  # the capability died with the route
    assert not upstream_requests(registry, r"/v2/built/ws/manifests/other")
    assert upstream_requests(registry, r'"POST /v2/built/ws/blobs/uploads/\?.*from=busybox.*" 201')
    text = f"pushing to {route.target}:t1 (cap {cap}, {auth['Authorization']})"
    scrubbed = h.proxy.scrub(text)
    assert cap not in scrubbed and auth["Authorization"].split()[1] not in scrubbed, scrubbed
    assert f"/v2/b/{host}/built/ws/manifests/t1" in caplog.text
    assert cap not in caplog.text


async def test_mirror_routes_are_read_only(
    make_proxy: ProxyFactory, registry: Registry, base_image: str
) -> None:
    h = await make_proxy(http_hosts=[registry.host])
    mirrors = {m.host: m.prefix for m in h.proxy.mirrors()}
    assert mirrors["docker.io"] == "mirror/docker.io"
    prefix = mirrors[registry.host]
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    async with h.session() as s:
        async with s.get(f"{h.url}/v2/{prefix}/busybox/manifests/latest", headers=accept) as r:
            assert r.status == 200
            by_prefix = r.headers["Docker-Content-Digest"]
        async with s.get(
            f"{h.url}/v2/busybox/manifests/latest", params={"ns": registry.host}, headers=accept
        ) as r:
            assert r.status == 200
            assert r.headers["Docker-Content-Digest"] == by_prefix
        # BuildKit v0.11 asks a mirror with a path as /<path>/v2/<repo>/... (tests/fixtures/
        # toolchain/README.md); later versions as /v2/<path>/<repo>/...
        async with s.get(f"{h.url}/{prefix}/v2/busybox/manifests/latest", headers=accept) as r:
            assert r.status == 200
            assert r.headers["Docker-Content-Digest"] == by_prefix
        async with s.get(f"{h.url}/{prefix}/v2busybox/manifests/latest") as r:
            assert r.status == 404
        async with s.post(f"{h.url}/{prefix}/v2/busybox/blobs/uploads/") as r:
            assert r.status == 403
        async with s.get(
            f"{h.url}/v2/busybox/manifests/latest", params={"ns": "unknown.example"}
        ) as r:
            assert r.status == 404
        async with s.post(f"{h.url}/v2/{prefix}/busybox/blobs/uploads/") as r:
            assert r.status == 403


async def test_refusals_forward_nothing(make_proxy: ProxyFactory, registry: Registry) -> None:
    h = await make_proxy(
        http_hosts=[registry.host],
        routes=[("ws", f"{registry.host}/team", "push"), ("ro", f"{registry.host}/ro", "pull")],
    )
    host, port = h.proxy.host_address.rsplit(":", 1)

    async def raw(path: str) -> int:
        reader, writer = await asyncio.open_connection(host, int(port))
        auth = h.headers["Authorization"]
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        writer.close()
        await writer.wait_closed()
        return status

    assert await raw("/v2/ws/../busybox/manifests/latest") == 404
    assert await raw("/v2/ws/%2e%2e/busybox/manifests/latest") == 400
    assert await raw("/v2/ws%2Fx/manifests/latest") == 400
    assert await raw("/v2/ws/a//b/manifests/latest") == 400
    assert await raw("/v2/unknown/manifests/latest") == 404
    assert await raw("/v2/ws/manifests/..") == 404
    assert await raw("/v2/ws/blobs/sha256:..%2f..") == 400
    async with h.session() as s:
        async with s.put(f"{h.url}/v2/ro/x/manifests/latest", data=b"{}") as r:
            assert r.status == 403
        async with s.delete(f"{h.url}/v2/ws/blobs/uploads/0123456789abcdef") as r:
            assert r.status == 404  # an upload id the proxy never handed out
    for method in ("GET", "HEAD", "PUT", "POST", "DELETE", "PATCH"):
        assert h.metric("build_agent_proxy_upstream_latency_seconds_count", method=method) == 0


async def test_upstream_errors_pass_through(make_proxy: ProxyFactory, registry: Registry) -> None:
    h = await team_proxy(make_proxy, registry.host)
    url = f"{h.url}/v2/ws/never-pushed/manifests/nope"
    async with h.session() as s, s.get(url) as r:
        assert r.status == 404
        body = await r.json()
        assert body["errors"][0]["code"] in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN")
        assert "WWW-Authenticate" not in r.headers


async def test_manifest_digest(
    make_proxy: ProxyFactory, registry: Registry, base_image: str
) -> None:
    h = await make_proxy(http_hosts=[registry.host])
    digest = await h.proxy.manifest_digest(base_image)
    assert digest is not None and digest.startswith("sha256:")
    async with aiohttp.ClientSession() as s:  # straight to the registry, not the proxy
        layer = os.urandom(100)
        pushed, _ = await push_image(s, registry.url, "digest/test", "v1", layer)
    assert await h.proxy.manifest_digest(f"{registry.host}/digest/test:v1") == pushed
    assert await h.proxy.manifest_digest(f"{registry.host}/digest/test:missing") is None
    with pytest.raises(BadRequest):
        await h.proxy.manifest_digest(f"{registry.host}/Bad Name:x")


async def test_stopped_registry_gives_503_after_bounded_retries(
    make_proxy: ProxyFactory, short_tmp: Path
) -> None:
    reg = start_registry(short_tmp / "doomed")
    try:
        h = await team_proxy(make_proxy, reg.host, retries=3)
        async with h.session() as s, s.get(f"{h.url}/v2/ws/x/tags/list") as r:
            assert r.status == 404  # reachable: the registry answers
        reg.stop()
        async with h.session() as s:
            started = asyncio.get_running_loop().time()
            async with s.get(f"{h.url}/v2/ws/x/manifests/latest") as r:
                assert r.status == 503
                err = (await r.json())["errors"][0]
            elapsed = asyncio.get_running_loop().time() - started
        assert err["code"] == "UNAVAILABLE"
        assert reg.host in err["message"] and "3 attempts" in err["message"]
        assert elapsed < 5
        assert h.metric("build_agent_proxy_retries_total", reason="connect") == 2
        with pytest.raises(UpstreamUnavailable) as exc:
            await h.proxy.manifest_digest(f"{reg.host}/team/x:latest")
        assert exc.value.registry == reg.host
    finally:
        reg.stop()


async def test_retries_honour_retry_after_then_give_a_named_503(
    make_proxy: ProxyFactory,
) -> None:
    """A failing upstream cannot be made from docker-registry: a small aiohttp server answers
    /v2/ (open) and fails manifests as a gateway would."""
    from aiohttp import web

    calls: list[float] = []
    fail = {"times": 2, "status": 503}

    async def v2(request: web.Request) -> web.Response:
        return web.json_response({})

    async def manifest(request: web.Request) -> web.Response:
        calls.append(asyncio.get_running_loop().time())
        if fail["times"] > 0:
            fail["times"] -= 1
            return web.Response(status=fail["status"], text="busy", headers={"Retry-After": "0"})
        return web.Response(status=200, body=b"{}", content_type="application/json")

    upstream = web.Application()
    upstream.router.add_get("/v2/", v2)
    upstream.router.add_route("*", "/v2/{repo:.+}/manifests/{ref}", manifest)
    runner = web.AppRunner(upstream, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        host = f"127.0.0.1:{port}"
        h = await make_proxy(http_hosts=[host], routes=[("ws", f"{host}/team", "push")], retries=3)
        async with h.session() as s:
            async with s.get(f"{h.url}/v2/ws/x/manifests/v1") as r:
                assert r.status == 200
            assert len(calls) == 3
            assert h.metric("build_agent_proxy_retries_total", reason="503") == 2
            fail.update(times=10, status=502)
            async with s.get(f"{h.url}/v2/ws/x/manifests/v1") as r:
                assert r.status == 503
                err = (await r.json())["errors"][0]
            assert host in err["message"] and "last answer: 502" in err["message"]
            # A body-carrying PUT is never replayed: one call, the answer passed through.
            before = len(calls)
            async with s.put(f"{h.url}/v2/ws/x/manifests/v1", data=b"{}") as r:
                assert r.status == 502
            assert len(calls) == before + 1
    finally:
        await runner.cleanup()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    from tests.infra.token_server import key_and_cert

    key, cert = key_and_cert("127.0.0.1", ip="127.0.0.1")
    cert_path, key_path = tmp / "tls.crt", tmp / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_is_verified_unless_insecure(make_proxy: ProxyFactory, short_tmp: Path) -> None:
    from agent.config import RegistryConfig

    reg = Registry(root=short_tmp / "tls", port=free_port(), tls=_self_signed(short_tmp))
    reg.start()
    try:
        strict = await make_proxy(routes=[("ws", f"{reg.host}/team", "pull")], retries=1)
        async with strict.session() as s:
            async with s.get(f"{strict.url}/v2/ws/x/tags/list") as r:
                assert r.status == 503
                message = (await r.json())["errors"][0]["message"]
            assert reg.host in message and "certificate" in message.lower()
            loose = await make_proxy(
                routes=[("ws", f"{reg.host}/team", "pull")],
                registries=[RegistryConfig(host=reg.host, insecure=True)],
            )
            async with s.get(f"{loose.url}/v2/ws/x/tags/list", headers=loose.headers) as r:
                assert r.status == 404  # reached the registry over HTTPS
                assert (await r.json())["errors"][0]["code"] == "NAME_UNKNOWN"
        # Over TLS, bodies take the streamed path (no splice): a 3 MiB blob up and down.
        rw = await make_proxy(
            routes=[("ws", f"{reg.host}/team", "push")],
            registries=[RegistryConfig(host=reg.host, insecure=True)],
        )
        data = os.urandom(3 << 20)
        async with rw.session() as s:
            async with s.post(f"{rw.url}/v2/ws/tls/blobs/uploads/") as r:
                loc = r.headers["Location"]
            async with s.put(
                f"{rw.url}{loc}&digest={digest_of(data)}",
                data=data,
                headers={"Content-Type": "application/octet-stream"},
            ) as r:
                assert r.status == 201, await r.text()
                assert "close" not in r.headers.get("Connection", "").lower()
            async with s.get(f"{rw.url}/v2/ws/tls/blobs/{digest_of(data)}") as r:
                assert await r.read() == data
    finally:
        reg.stop()


@pytest.mark.heavy
async def test_memory_stays_flat_for_a_large_blob(
    make_proxy: ProxyFactory, registry: Registry
) -> None:
    """64 MiB up and down through the in-process proxy: Python's allocations stay far below the
    blob's size (the bench measures RSS of a separate proxy process at 1 GiB)."""
    import tracemalloc

    h = await team_proxy(make_proxy, registry.host)
    size, piece = 64 << 20, os.urandom(1 << 20)
    digest = digest_of(piece * (size // len(piece)))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(piece)):
            yield piece

    tracemalloc.start()
    try:
        async with h.session() as s:
            async with s.post(f"{h.url}/v2/ws/big/blobs/uploads/") as r:
                loc = r.headers["Location"]
            async with s.put(
                f"{h.url}{loc}&digest={digest}",
                data=body(),
                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            ) as r:
                assert r.status == 201, await r.text()
            got = hashlib.sha256()
            async with s.get(f"{h.url}/v2/ws/big/blobs/{digest}") as r:
                async for chunk in r.content.iter_any():
                    got.update(chunk)
            assert f"sha256:{got.hexdigest()}" == digest
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak Python allocations {peak / (1 << 20):.1f} MiB"


async def test_upstream_breaking_off_cuts_the_client(make_proxy: ProxyFactory) -> None:
    """A registry that dies mid-blob (a stand-in: docker-registry cannot be made to) must not
    leave the client with a short body that looks complete."""
    from aiohttp import web

    async def v2(request: web.Request) -> web.Response:
        return web.json_response({})

    async def blob(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.close()
        return resp

    upstream = web.Application()
    upstream.router.add_get("/v2/", v2)
    upstream.router.add_get("/v2/{repo:.+}/blobs/{digest}", blob)
    runner = web.AppRunner(upstream, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        h = await make_proxy(http_hosts=[host], routes=[("ws", f"{host}/team", "pull")])
        async with h.session() as s:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(f"{h.url}/v2/ws/x/blobs/{digest_of(b'')}") as r:
                    assert r.status == 200
                    await r.read()
        assert h.metric("build_agent_proxy_upstream_errors_total", kind="broke_off") == 1
    finally:
        await runner.cleanup()


async def test_large_blob_download_is_exact_and_keeps_the_connection(
    make_proxy: ProxyFactory, registry: Registry
) -> None:
    """Blobs of a MiB and more leave through splice(2): bytes, ranges and keep-alive hold."""
    h = await team_proxy(make_proxy, registry.host)
    data = os.urandom(5 * (1 << 20) + 17)
    conn = aiohttp.TCPConnector(limit=1)  # one connection: every request reuses it
    async with h.session(connector=conn) as s:
        # Up: a monolithic PUT with a length is spliced; its connection is closed after.
        async with s.post(f"{h.url}/v2/ws/spliced/blobs/uploads/") as r:
            loc = r.headers["Location"]
        digest = digest_of(data)
        async with s.put(
            f"{h.url}{loc}&digest={digest}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        ) as r:
            assert r.status == 201, await r.text()  # the registry checked the digest
            assert r.headers.get("Connection", "").lower() == "close"
        assert h.metric("build_agent_proxy_bytes_total", direction="up") == len(data)
        for _ in range(2):
            async with s.get(f"{h.url}/v2/ws/spliced/blobs/{digest}") as r:
                assert r.status == 200
                assert await r.read() == data
        rng = {"Range": f"bytes=1000-{(2 << 20) + 999}"}
        async with s.get(f"{h.url}/v2/ws/spliced/blobs/{digest}", headers=rng) as r:
            assert r.status == 206
            assert await r.read() == data[1000 : (2 << 20) + 1000]
        async with s.get(f"{h.url}/v2/", headers={"Authorization": "Basic eDp5"}) as r:
            assert r.status == 401  # the ping's challenge, on the same connection
    assert h.metric("build_agent_proxy_bytes_total", direction="down") == 2 * len(data) + (2 << 20)
