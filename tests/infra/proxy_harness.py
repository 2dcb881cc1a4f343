"""Fixtures for the proxy tests: the proxy in-process (open_proxy with an OffSandbox),
the htpasswd and token-auth registries, and a helper to run real clients without blocking the
loop the proxy serves on."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.config import (
    BuildConfig,
    Config,
    CredentialConfig,
    DaemonConfig,
    ProxyConfig,
    RegistryConfig,
    RouteConfig,
)
from agent.proxy import Proxy, open_proxy
from agent.runtime import App
from agent.sandbox import OffSandbox
from tests.infra.registry import Registry, free_port, start_registry
from tests.infra.token_server import TokenRegistry, start_token_registry

USER = "alice"
PASSWORD = "pw-Zq8tXv3LmN"  # distinctive: the leak test greps for it


@dataclass
class Harness:
    proxy: Proxy
    app: App

    @property
    def url(self) -> str:
        """The host-side listener: every request there needs ``headers`` (or a build login)."""
        return f"http://{self.proxy.host_address}"

    @property
    def creds(self) -> str:
        """``user:token`` for the host listener (skopeo ``--creds``, curl ``-u``)."""
        token = Path(self.proxy.host_listener()["token_file"]).read_text().strip()
        return f"operator:{token}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(self.creds.encode()).decode()}

    def session(self, **kw: Any) -> aiohttp.ClientSession:
        """A client of the host listener holding its token."""
        return aiohttp.ClientSession(headers=self.headers, **kw)

    def metric(self, name: str, **labels: str) -> float:
        value = self.app.registry.get_sample_value(name, labels)
        return value or 0.0


ProxyFactory = Callable[..., Awaitable[Harness]]


def write_docker_config(path: Path, data: dict[str, Any]) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return path


@pytest.fixture
async def make_proxy(short_tmp: Path) -> AsyncIterator[ProxyFactory]:
    """``await make_proxy(registries=[host...], routes=[(name, upstream, access)], ...)``."""
    stack = AsyncExitStack()

    async def factory(
        *,
        http_hosts: Sequence[str] = (),
        routes: Sequence[RouteConfig | tuple[str, str, str]] = (),
        credentials: Sequence[tuple[str, str, str]] = (),
        docker_config: Path | None = None,
        registries: Sequence[RegistryConfig] = (),
        **proxy_kw: Any,
    ) -> Harness:
        proxy_kw.setdefault("retries", 3)
        proxy_kw.setdefault("host_address", "127.0.0.1:0")
        proxy_kw.setdefault("retry_max_backoff", 0.2)
        proxy_kw.setdefault("connect_timeout", 2.0)
        cfg = Config(
            daemon=DaemonConfig(runtime_dir=str(short_tmp / "run")),
            build=BuildConfig(docker_config=str(docker_config or short_tmp / "no-config.json")),
            proxy=ProxyConfig(
                port=free_port(),
                routes=[r if isinstance(r, RouteConfig) else RouteConfig(*r) for r in routes],
                registries=[RegistryConfig(host=h, http=True) for h in http_hosts]
                + list(registries),
                credentials=[CredentialConfig(h, u, p) for h, u, p in credentials],
                **proxy_kw,
            ),
        )
        app = App(config=cfg)
        proxy = await stack.enter_async_context(open_proxy(cfg, app.registry, OffSandbox()))
        return Harness(proxy, app)

    try:
        yield factory
    finally:
        await stack.aclose()


async def team_proxy(
    make_proxy: ProxyFactory, host: str, *, login: bool = False, **kw: Any
) -> Harness:
    """A proxy whose static route ``ws`` pushes to ``<host>/team`` over plain HTTP; ``login``
    gives it USER's inline credentials for ``host``."""
    if login:
        kw["credentials"] = [(host, USER, PASSWORD)]
    return await make_proxy(http_hosts=[host], routes=[("ws", f"{host}/team", "push")], **kw)


@pytest.fixture(scope="session")
def htpasswd_registry(session_tmp: Path) -> Iterator[Registry]:
    reg = start_registry(
        session_tmp / "registry-htpasswd", kind="htpasswd", username=USER, password=PASSWORD
    )
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def token_registry(session_tmp: Path) -> Iterator[TokenRegistry]:
    tr = start_token_registry(session_tmp / "registry-token", {USER: PASSWORD})
    try:
        yield tr
    finally:
        tr.stop()


@dataclass
class Result:
    rc: int
    out: str
    err: str


async def run(*argv: str, limit: float = 120.0, env: dict[str, str] | None = None) -> Result:
    """Run a client (skopeo, buildah) while this loop keeps serving the in-process proxy."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except BaseException:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    return Result(proc.returncode or 0, out.decode(), err.decode())


def skopeo_env(tmp: Path) -> dict[str, str]:
    """No credentials for the client: only the proxy holds them."""
    (tmp / "empty-docker").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_AUTH", "DOCKER"))}
    env["DOCKER_CONFIG"] = str(tmp / "empty-docker")
    env["REGISTRY_AUTH_FILE"] = str(tmp / "empty-auth.json")
    (tmp / "empty-auth.json").write_text("{}")
    return env


# --- raw distribution API calls through the proxy ---------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push_blob(
    s: aiohttp.ClientSession, base: str, repo: str, data: bytes, *, chunk: int = 0
) -> str:
    """POST + PATCH (in ``chunk``-sized pieces when given) + PUT, as a client does."""
    digest = digest_of(data)
    async with s.post(f"{base}/v2/{repo}/blobs/uploads/") as r:
        assert r.status == 202, await r.text()
        loc = r.headers["Location"]
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    offset = 0
    for piece in pieces:
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + len(piece) - 1}",
        }
        async with s.patch(_abs(base, loc), data=piece, headers=headers) as r:
            assert r.status == 202, await r.text()
            loc = r.headers["Location"]
        offset += len(piece)
    sep = "&" if "?" in loc else "?"
    async with s.put(f"{_abs(base, loc)}{sep}digest={digest}") as r:
        assert r.status == 201, await r.text()
    return digest


def _abs(base: str, loc: str) -> str:
    return loc if loc.startswith("http") else base + loc


async def push_image(
    s: aiohttp.ClientSession, base: str, repo: str, tag: str, layer: bytes
) -> tuple[str, bytes]:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    cfg_digest = await push_blob(s, base, repo, config)
    layer_digest = await push_blob(s, base, repo, layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cfg_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    async with s.put(
        f"{base}/v2/{repo}/manifests/{tag}",
        data=manifest,
        headers={"Content-Type": OCI_MANIFEST},
    ) as r:
        assert r.status == 201, await r.text()
    return digest_of(manifest), manifest
