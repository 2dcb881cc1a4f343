"""Send one request upstream with credentials, one forced token refresh on a 401, and retries.

Retried: GET, HEAD and an upload-initiating POST without a body, on connect errors and on
429/500/502/503/504, with capped exponential backoff and jitter that honours ``Retry-After``.
A request whose body is a client's stream is sent once: the stream cannot be replayed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import aiohttp
from aiohttp.payload import Payload
from multidict import CIMultiDict
from yarl import URL

from agent.errors import UpstreamUnavailable
from agent.proxy._auth import Authenticator, _describe
from agent.proxy._metrics import ProxyMetrics
from agent.proxy._transport import Transport

log = logging.getLogger("agent.proxy")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_GATEWAY_STATUSES = frozenset({502, 503, 504})
_CONNECT_ERRORS = (
    aiohttp.ClientConnectorError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ServerTimeoutError,
    TimeoutError,
)
_BASE_BACKOFF = 0.1

Body = AsyncIterable[bytes] | Payload | bytes | None


@dataclass
class Outgoing:
    """One upstream request. ``body`` is None, bytes (replayable) or a stream (sent once)."""

    registry: str
    method: str
    url: str
    headers: CIMultiDict[str]
    scopes: frozenset[str]
    body: Body = None
    retryable: bool = False

    @property
    def replayable(self) -> bool:
        return self.body is None or isinstance(self.body, bytes)


class Upstream:
    def __init__(
        self,
        transport: Transport,
        auth: Authenticator,
        metrics: ProxyMetrics,
        *,
        retries: int,
        max_backoff: float,
    ) -> None:
        self._transport = transport
        self._auth = auth
        self._metrics = metrics
        self._retries = retries
        self._max_backoff = max_backoff

    async def send(self, out: Outgoing) -> aiohttp.ClientResponse:
        """The upstream response (the caller releases it). Raises UpstreamUnavailable when the
        registry cannot be reached within the retry budget, UpstreamUnauthorized when the
        credentials are refused before the request is sent (token server, helper)."""
        attempts = self._retries if (out.retryable and out.replayable) else 1
        attempt = 0
        refreshed = False
        while True:
            attempt += 1
            try:
                auth = await self._auth.header(out.registry, out.scopes, force=refreshed)
            except UpstreamUnavailable:
                # Nothing of the request was sent yet (challenge probe or token server down):
                # safe to try again even for a streamed body.
                if attempt >= self._retries:
                    raise
                await self._pause("connect", self._backoff(attempt, None))
                continue
            resp = await self._request(out, auth, attempt, attempts)
            if resp is None:  # not reached, and attempts are left
                await self._pause("connect", self._backoff(attempt, None))
                continue
            status = resp.status
            if status == 401 and not refreshed and out.replayable:
                # Key rotated, token revoked, or the challenge changed: one fresh try.
                self._auth.note_challenge(out.registry, resp.headers.get("WWW-Authenticate", ""))
                self._auth.forget(out.registry, out.scopes)
                resp.release()
                refreshed = True
                log.debug("registry %s answered 401; refreshing credentials once", out.registry)
                continue
            if status == 401:
                self._auth.forget(out.registry, out.scopes)
            if status in RETRY_STATUSES and attempt < attempts:
                delay = self._backoff(attempt, resp.headers)
                resp.release()
                await self._pause(str(status), delay)
                continue
            if status in _GATEWAY_STATUSES and attempts > 1:
                # A gateway's bare 502/503/504 tells the client nothing: say which registry.
                resp.release()
                self._metrics.upstream_errors.labels("unavailable").inc()
                raise UpstreamUnavailable(
                    f"registry {out.registry} is unavailable after {attempt} attempts "
                    f"(last answer: {status})",
                    registry=out.registry,
                )
            return resp

    async def _request(
        self, out: Outgoing, auth: str | None, attempt: int, attempts: int
    ) -> aiohttp.ClientResponse | None:
        """One try: the response, None when the registry was not reached and ``attempts`` allow
        another, or UpstreamUnavailable."""
        headers = out.headers.copy()
        if auth is not None:
            headers["Authorization"] = auth
        started = time.perf_counter()
        try:
            resp = await self._transport.session.request(
                out.method,
                # Sent as written: an upload's _state query must reach the registry intact.
                URL(out.url, encoded=True),
                headers=headers,
                data=out.body,
                ssl=self._transport.ssl_for(out.registry),
                allow_redirects=out.method in ("GET", "HEAD"),
                max_redirects=5,
            )
        except _CONNECT_ERRORS as exc:
            if attempt < attempts:
                return None
            self._metrics.upstream_errors.labels("unreachable").inc()
            raise UpstreamUnavailable(
                f"registry {out.registry} is unavailable after {attempt} attempt"
                f"{'s' if attempt > 1 else ''}: {_describe(exc)}",
                registry=out.registry,
            ) from exc
        except aiohttp.ClientError as exc:  # redirects, bad URLs, a body that broke off
            self._metrics.upstream_errors.labels("failed").inc()
            raise UpstreamUnavailable(
                f"request to registry {out.registry} failed: {_describe(exc)}",
                registry=out.registry,
            ) from exc
        self._metrics.upstream_answered(out.method, time.perf_counter() - started)
        return resp

    async def _pause(self, reason: str, delay: float) -> None:
        self._metrics.retries.labels(reason).inc()
        await asyncio.sleep(delay)

    def _backoff(self, attempt: int, headers: Mapping[str, str] | None) -> float:
        if headers is not None:
            after = _retry_after(headers.get("Retry-After"))
            if after is not None:
                return min(after, self._max_backoff)
        base = min(self._max_backoff, _BASE_BACKOFF * 2.0 ** (attempt - 1))
        return base / 2 + random.uniform(0, base / 2)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
