"""The host listener's token, and the static-route rules of the children's listener
(agent/proxy/_access.py), in-process against real registries: ``children = true`` routes are
read-only, unless ``builds`` names the repositories whose builds may write, and then only with
such a build's own login. (With OffSandbox the children's listener is ``child_address`` on the
host's loopback.)"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import aiohttp
import pytest

from agent.config import RouteConfig
from agent.contracts import RouteTarget
from agent.errors import ConfigError, StartupError
from tests.infra.proxy_harness import (
    OCI_MANIFEST,
    ProxyFactory,
    htpasswd_registry,
    make_proxy,
    push_image,
)
from tests.infra.registry import Registry
from tests.test_proxy_forward import upstream_requests

__all__ = ["htpasswd_registry", "make_proxy"]  # fixtures


def _basic(password: str) -> dict[str, str]:
    return {
        "Authorization": "Basic " + base64.b64encode(f"build-agent:{password}".encode()).decode()
    }


async def test_builds_names_who_may_write_from_the_sandbox(
    make_proxy: ProxyFactory, htpasswd_registry: Registry
) -> None:
    reg = htpasswd_registry
    h = await make_proxy(
        http_hosts=[reg.host],
        credentials=[(reg.host, "alice", "pw-Zq8tXv3LmN")],
        routes=[
            RouteConfig("cache", f"{reg.host}/cache", "push", True, [f"{reg.host}/ws"]),
            RouteConfig("shared", f"{reg.host}/shared", "push", True),
            RouteConfig("ops", f"{reg.host}/shared", "push"),
        ],
    )
    async with h.session() as s:  # the operator seeds an image on the host listener
        _, manifest = await push_image(s, h.url, "ops/app", "1", b"layer-bytes")
    mine = h.proxy.add_build_route(base=None, target=RouteTarget(f"{reg.host}/ws/app", "t", True))
    other = h.proxy.add_build_route(base=None, target=RouteTarget(f"{reg.host}/else", "t", True))
    child = f"http://{h.proxy.child_address}/v2"
    assert mine.login is not None and other.login is not None
    async with aiohttp.ClientSession() as s:

        async def status(method: str, path: str, login: str | None = None) -> int:
            headers = {"Accept": OCI_MANIFEST, **(_basic(login) if login else {})}
            async with s.request(method, f"{child}/{path}", headers=headers) as r:
                return r.status

        assert await status("GET", "shared/app/manifests/1") == 200
        assert await status("GET", "ops/app/manifests/1") == 404  # not for children
        assert await status("POST", "shared/x/blobs/uploads/") == 403
        assert await status("POST", "shared/x/blobs/uploads/", mine.login.password) == 403
        assert await status("POST", "cache/x/blobs/uploads/") == 403
        assert await status("POST", "cache/x/blobs/uploads/", other.login.password) == 403
        assert await status("POST", "cache/x/blobs/uploads/", mine.login.password) == 202
        # A build's cross-repo mount cannot take blobs from a route children do not see.
        layer = "sha256:" + hashlib.sha256(b"layer-bytes").hexdigest()
        mount = f"cache/x/blobs/uploads/?mount={layer}&from=ops/app"
        assert await status("POST", mount, mine.login.password) == 202  # a plain upload
        mount = f"cache/x/blobs/uploads/?mount={layer}&from=shared/app"
        assert await status("POST", mount, mine.login.password) == 201  # mounted
        h.proxy.remove_build_route(mine)
        assert await status("POST", "cache/x/blobs/uploads/", mine.login.password) == 403
    assert manifest
    assert not upstream_requests(reg, r"/v2/shared/x/")  # the refusals sent nothing upstream


async def test_an_operator_token_file_is_checked_and_reloaded(
    make_proxy: ProxyFactory, registry: Registry, short_tmp: Path
) -> None:
    token_file = short_tmp / "host.token"
    token_file.write_text("too-short\n")
    token_file.chmod(0o600)
    with pytest.raises(ConfigError, match=r"proxy.host_token_file .* 16 to"):
        await make_proxy(host_token_file=str(token_file))
    token_file.write_text("first-token-0123456789\n")
    token_file.chmod(0o644)
    with pytest.raises(StartupError, match=r"readable by others .* chmod 600"):
        await make_proxy(host_token_file=str(token_file))
    token_file.chmod(0o600)
    h = await make_proxy(
        http_hosts=[registry.host],
        routes=[("ws", f"{registry.host}/team", "pull")],
        host_token_file=str(token_file),
    )
    assert h.proxy.host_listener() == {
        "address": h.proxy.host_address,
        "auth": "token",
        "token_file": str(token_file),
    }
    url = f"{h.url}/v2/ws/x/tags/list"
    async with aiohttp.ClientSession() as s:

        async def status(token: str) -> int:
            auth = "Basic " + base64.b64encode(f"op:{token}".encode()).decode()
            async with s.get(url, headers={"Authorization": auth}) as r:
                return r.status

        assert await status("first-token-0123456789") == 404  # reached the registry
        token_file.write_text("second-token-0123456789\n")
        h.proxy.reload()
        assert await status("first-token-0123456789") == 401
        assert await status("second-token-0123456789") == 404
    assert h.proxy.scrub("a first-token-0123456789 b second-token-0123456789") == "a *** b ***"
    assert not (short_tmp / "run" / "proxy-host.token").exists()  # none was made


async def test_the_host_listener_can_be_off(make_proxy: ProxyFactory, registry: Registry) -> None:
    h = await make_proxy(http_hosts=[registry.host], host_address="")
    assert h.proxy.host_address == ""
    assert h.proxy.host_listener() == {"address": "off", "auth": "none (no listener)"}
    # The daemon's own lookups go upstream directly and do not need it.
    assert await h.proxy.manifest_digest(f"{registry.host}/nothing:here") is None
