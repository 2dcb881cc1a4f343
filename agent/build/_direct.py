"""A stand-in for the registry proxy when the daemon runs without one: children talk to the
upstream registries directly, anonymously, and only plain-HTTP registries listed in
``proxy.registries`` (``http = true``) are reachable.

This exists for development and for the build tests while the proxy is absent; it holds no
credentials and scopes nothing, so ``open_builds`` logs a loud warning when it is used. With the
real proxy (``app.proxy``) it is never used.
"""

from __future__ import annotations

import logging

import aiohttp

from agent import reference
from agent.config import Config
from agent.errors import BadRequest, UpstreamUnauthorized, UpstreamUnavailable
from agent.ports import BuildRoute, Mirror, RouteTarget

log = logging.getLogger("agent.build")

_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


class DirectRegistry:
    """RegistryPort without a proxy: routes are the upstream repositories themselves."""

    def __init__(self, config: Config) -> None:
        self.http_hosts = [r.host for r in config.proxy.registries if r.http]
        self._session: aiohttp.ClientSession | None = None
        self.state = "direct (no proxy)"

    @property
    def child_address(self) -> str:
        return ""

    @property
    def host_address(self) -> str:
        return ""

    def mirrors(self) -> list[Mirror]:
        return []

    def add_build_route(
        self, *, base: RouteTarget | None, target: RouteTarget, cache: RouteTarget | None = None
    ) -> BuildRoute:
        return BuildRoute(
            base=base.repo if base else None,
            target=target.repo,
            login=None,
            cache=cache.repo if cache else None,
        )

    def remove_build_route(self, route: BuildRoute) -> None:
        return None

    def scrub(self, text: str) -> str:
        return text

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def manifest_digest(self, ref: str) -> str | None:
        r = reference.parse(ref, what="reference")
        host, _, path = r.repo.partition("/")
        if not path or host not in self.http_hosts:
            raise BadRequest(
                f"{ref}: without the registry proxy only plain-HTTP registries listed in "
                "proxy.registries (http = true) can be used"
            )
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        url = f"http://{host}/v2/{path}/manifests/{r.digest or r.tag or 'latest'}"
        try:
            async with self._session.head(url, headers={"Accept": _ACCEPT}) as resp:
                if resp.status == 200:
                    return resp.headers.get("Docker-Content-Digest") or r.digest
                if resp.status == 404:
                    return None
                if resp.status in (401, 403):
                    raise UpstreamUnauthorized(
                        f"{host} refused to show {ref} ({resp.status}); "
                        "the registry needs credentials",
                        registry=host,
                    )
                raise UpstreamUnavailable(f"{host} answered {resp.status} for {ref}", registry=host)
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"{host} cannot be reached: {exc}", registry=host) from exc
