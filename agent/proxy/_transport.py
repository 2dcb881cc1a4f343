"""How the proxy reaches each upstream registry: one shared aiohttp ClientSession (one connection
pool), the scheme and TLS verification per registry (``[[proxy.registries]] http / insecure``)."""

from __future__ import annotations

import ssl

import aiohttp

from agent.config import ProxyConfig
from agent.reference import api_host, canonical_host

# Large reads keep the per-chunk overhead of the Python loop small on multi-GiB blobs while
# bounding what one connection holds (STYLE: memory must not grow with the blob).
READ_BUFSIZE = 1 << 20


class Transport:
    """Base URLs, TLS settings and the shared session."""

    def __init__(self, config: ProxyConfig) -> None:
        self._plain: set[str] = set()
        self._insecure: set[str] = set()
        for r in config.registries:
            host = canonical_host(r.host)
            if r.http:
                self._plain.add(host)
            if r.insecure:
                self._insecure.add(host)
        self._connect_timeout = config.connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, str] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=256, limit_per_host=64, ttl_dns_cache=60, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Blobs pass through byte for byte: no gzip decoding, no cookies, no env proxies.
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._connect_timeout, sock_read=300
            ),
            read_bufsize=READ_BUFSIZE,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("proxy transport is not started")
        return self._session

    def base_url(self, registry: str) -> str:
        url = self._urls.get(registry)
        if url is None:
            host = canonical_host(registry)
            scheme = "http" if host in self._plain else "https"
            url = self._urls[registry] = f"{scheme}://{api_host(host)}"
        return url

    def ssl_for(self, registry: str) -> bool | ssl.SSLContext:
        """``True`` verifies (the default); ``False`` only for ``insecure`` registries."""
        return canonical_host(registry) not in self._insecure
