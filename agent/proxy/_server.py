"""The proxy as one object: listeners, route table, credentials, and the RegistryPort API."""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from typing import Literal

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from agent import reference
from agent.config import Config
from agent.contracts import BuildRoute, Mirror, RouteTarget, SandboxPort
from agent.errors import (
    AgentError,
    ConfigError,
    StartupError,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from agent.proxy._access import HOST, SANDBOX, HostToken, StaticRules
from agent.proxy._auth import Authenticator, scope
from agent.proxy._credentials import CredentialStore
from agent.proxy._forward import Forwarder
from agent.proxy._metrics import ProxyMetrics
from agent.proxy._routes import LOGIN_USER, Router
from agent.proxy._scrub import Scrubber
from agent.proxy._transport import READ_BUFSIZE, Transport
from agent.proxy._uploads import Uploads
from agent.proxy._upstream import Outgoing, Upstream

log = logging.getLogger("agent.proxy")

# What a resolver accepts for HEAD /v2/<repo>/manifests/<tag>: OCI and Docker, images and indexes.
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
_MAX_MANIFEST = 4 << 20

ProxyState = Literal["stopped", "starting", "running"]


class Proxy:
    """The running registry proxy; satisfies :class:`agent.contracts.RegistryPort`."""

    def __init__(self, config: Config, registry: CollectorRegistry, sandbox: SandboxPort) -> None:
        cfg = config.proxy
        self._sandbox = sandbox
        self._port = cfg.port
        self._host_address = cfg.host_address
        self.metrics = ProxyMetrics(registry)
        self.transport = Transport(cfg)
        self.credentials = CredentialStore(
            config.build.docker_config, cfg.credentials, helper_timeout=cfg.helper_timeout
        )
        self.auth = Authenticator(
            self.credentials, self.transport, self.metrics, token_ttl=cfg.token_ttl
        )
        self.upstream = Upstream(
            self.transport,
            self.auth,
            self.metrics,
            retries=cfg.retries,
            max_backoff=cfg.retry_max_backoff,
        )
        self.router = Router(cfg)
        self.rules = StaticRules(cfg.routes)
        self.host_token = HostToken(config)
        self.uploads = Uploads()
        self._runners: list[web.ServerRunner] = []
        self._child_address = ""
        self._host_bound = ""
        self._scrub = Scrubber(
            LOGIN_USER,
            lambda: [
                *self.credentials.secrets(),
                *self.auth.token_values(),
                *self.host_token.values(),
            ],
            lambda: (
                self.credentials.secrets_count(),
                self.auth.tokens_seen,
                self.host_token.generation,
            ),
        )
        self._state: ProxyState = "stopped"

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._state = "starting"
        await self.transport.start()
        try:
            child_sock = self._sandbox.listen(self._port)
        except OSError as exc:
            raise StartupError(
                f"registry proxy cannot listen on port {self._port} in the sandbox: "
                f"{exc.strerror}; free the port or change proxy.port"
            ) from exc
        await self._serve(SANDBOX, child_sock)
        self._child_address = f"localhost:{child_sock.getsockname()[1]}"
        if self._host_address:
            self.host_token.load()
            host_sock = _bind(self._host_address)
            await self._serve(HOST, host_sock)
            host, port = host_sock.getsockname()[:2]
            self._host_bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._state = "running"
        log.info(
            "registry proxy listening on %s (sandbox %s) and %s",
            self._child_address,
            self._sandbox.mode,
            f"{self._host_bound} (token in {self.host_token.path})"
            if self._host_bound
            else "not on the host (proxy.host_address is empty)",
        )

    async def _serve(self, side: str, sock: socket.socket) -> None:
        """One aiohttp server per listener: the Forwarder knows which side it serves."""
        forwarder = Forwarder(
            self.router,
            self.uploads,
            self.upstream,
            self.transport,
            self.metrics,
            side=side,
            rules=self.rules,
            host_token=self.host_token if side == HOST else None,
        )
        server = web.Server(forwarder, access_log=None, read_bufsize=READ_BUFSIZE)
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        self._runners.append(runner)
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            raise

    def host_listener(self) -> dict[str, str]:
        """What ``info`` says about the host-side listener."""
        if not self._host_bound:
            return {"address": "off", "auth": "none (no listener)"}
        return {"address": self._host_bound, "auth": "token", "token_file": self.host_token.path}

    async def close(self) -> None:
        while self._runners:
            await self._runners.pop().cleanup()
        self.host_token.remove()
        await self.transport.close()
        if self._state != "stopped":
            log.info("registry proxy stopped")
        self._state = "stopped"

    @property
    def state(self) -> ProxyState:
        return self._state

    # --- RegistryPort -------------------------------------------------------------------------

    @property
    def child_address(self) -> str:
        return self._child_address

    @property
    def host_address(self) -> str:
        return self._host_bound

    def mirrors(self) -> list[Mirror]:
        return self.router.mirrors()

    def add_build_route(
        self, *, base: RouteTarget | None, target: RouteTarget, cache: RouteTarget | None = None
    ) -> BuildRoute:
        route = self.router.add_build(self._child_address, base, target, cache)
        assert route.login is not None
        self._scrub.add_cap(route.login.password)
        log.debug("build route added (%d active)", self.router.build_count)
        return route

    def remove_build_route(self, route: BuildRoute) -> None:
        self.router.remove_build(route)
        log.debug("build route removed (%d active)", self.router.build_count)

    def reload(self) -> None:
        """Re-read the credential file and an operator's host token file (SIGHUP, the ``reload``
        op). A broken file keeps what was loaded before and raises ConfigError saying why."""
        token_error = None
        if self._host_bound:
            try:
                self.host_token.reload()
            except AgentError as exc:
                token_error = exc.message
        ok = self.credentials.reload()
        self.auth.clear()
        if token_error is not None:
            raise ConfigError(f"{token_error}; the previous host token stays in use")
        if not ok:
            raise ConfigError(
                f"{self.credentials.last_error}; the previous credentials stay in use, fix "
                "the file (build.docker_config) and reload again"
            )

    def scrub(self, text: str) -> str:
        """``text`` with every credential, token and capability (also in its Basic form) ever
        seen replaced by ``***`` (_scrub.py: one line costs the same after a million builds)."""
        return self._scrub(text)

    async def manifest_digest(self, ref: str) -> str | None:
        r = reference.parse(ref)
        url = f"{self.transport.base_url(r.registry)}/v2/{r.repository}/manifests/{r.ref}"
        started = time.perf_counter()
        resp = await self.upstream.send(_manifest_request(r, "HEAD", url))
        try:
            status = resp.status
            if status == 404:
                return None
            if status in (401, 403):
                raise UpstreamUnauthorized(
                    f"registry {r.registry} refused the proxy's credentials for {r.repository} "
                    f"({status}); check build.docker_config",
                    registry=r.registry,
                )
            if status >= 400:
                raise UpstreamUnavailable(
                    f"registry {r.registry} answered {status} for {r.repository}:{r.ref}",
                    registry=r.registry,
                )
            digest = resp.headers.get("Docker-Content-Digest")
        finally:
            resp.release()
        log.debug(
            "manifest of %s resolved in %.1f ms",
            r.canonical,
            (time.perf_counter() - started) * 1000,
        )
        if digest:
            return digest
        if r.digest:
            return r.digest
        return await self._hash_manifest(r, url)

    async def _hash_manifest(self, r: reference.Reference, url: str) -> str:
        """Some registries omit Docker-Content-Digest on HEAD: hash the manifest's bytes."""
        resp = await self.upstream.send(_manifest_request(r, "GET", url))
        try:
            if resp.status >= 400:
                raise UpstreamUnavailable(
                    f"registry {r.registry} answered {resp.status} for {r.repository}:{r.ref}",
                    registry=r.registry,
                )
            h = hashlib.sha256()
            size = 0
            async for chunk in resp.content.iter_any():
                size += len(chunk)
                if size > _MAX_MANIFEST:
                    raise UpstreamUnavailable(
                        f"registry {r.registry} sent a manifest over 4 MiB for {r.repository}",
                        registry=r.registry,
                    )
                h.update(chunk)
        finally:
            resp.release()
        return f"sha256:{h.hexdigest()}"


def _manifest_request(r: reference.Reference, method: str, url: str) -> Outgoing:
    return Outgoing(
        registry=r.registry,
        method=method,
        url=url,
        headers=CIMultiDict(Accept=MANIFEST_ACCEPT),
        scopes=frozenset({scope(r.repository, ["pull"])}),
        retryable=True,
    )


def _bind(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"registry proxy cannot listen on proxy.host_address {address}: {exc.strerror}; "
            "free the address or change proxy.host_address"
        ) from exc
    sock.setblocking(False)
    return sock
