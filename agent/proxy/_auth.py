"""Upstream authentication: challenges, Basic, and cached Bearer tokens.

A registry's challenge is learnt once by ``GET /v2/`` (what docker and containerd call a ping) and
kept until a 401 says otherwise, so a request with a streamed body is sent with credentials
the first time. Bearer tokens follow the Docker token spec (distribution ``docs/spec/auth/
token.md``): ``GET <realm>?service=<service>&scope=<scope>...`` with Basic credentials (or none:
an anonymous token), or the OAuth2 ``refresh_token`` grant when the credential is an identity
token (``docs/spec/auth/oauth.md``). A token is cached per (registry, scope set) until shortly
before ``issued_at + expires_in`` (``expires_in`` defaults to ``proxy.token_ttl``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp

from agent.errors import UpstreamUnauthorized, UpstreamUnavailable
from agent.proxy._credentials import Credential, CredentialStore
from agent.proxy._metrics import ProxyMetrics
from agent.proxy._transport import Transport

log = logging.getLogger("agent.proxy")

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')
_MAX_TOKENS = 4096
_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)(?=\s|$)")


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge. ``scheme`` is lower case; "none" for an open registry."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


OPEN = Challenge("none")


def parse_challenges(header: str) -> list[Challenge]:
    """RFC 7235 ``WWW-Authenticate``: ``Scheme k=v, k="v, with commas", Scheme2 ...``."""
    out: list[Challenge] = []
    pos = 0
    while pos < len(header):
        m = _SCHEME.match(header, pos)
        if m is None:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while pos < len(header):
            p = _PARAM.match(header, pos)
            if p is None:
                break
            value = p.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[p.group(1).lower()] = value
            pos = p.end()
        out.append(Challenge(scheme, params))
        while pos < len(header) and header[pos] in ", ":
            pos += 1
    return out


def pick_challenge(header: str) -> Challenge:
    found = parse_challenges(header)
    for c in found:  # Bearer first: it is what every token-auth registry means
        if c.scheme == "bearer" and c.params.get("realm"):
            return c
    for c in found:
        if c.scheme == "basic":
            return c
    return Challenge("basic") if not found else found[0]


def scope(repository: str, actions: Iterable[str]) -> str:
    return f"repository:{repository}:{','.join(sorted(set(actions)))}"


@dataclass
class _Token:
    value: str
    expires: float  # monotonic


class Authenticator:
    """Produces the ``Authorization`` header for a request to a registry with given scopes."""

    def __init__(
        self,
        creds: CredentialStore,
        transport: Transport,
        metrics: ProxyMetrics,
        *,
        token_ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._creds = creds
        self._transport = transport
        self._metrics = metrics
        self._token_ttl = token_ttl
        self.clock = clock
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, frozenset[str]], _Token] = {}
        self._locks: dict[tuple[str, frozenset[str]], asyncio.Lock] = {}
        self._recent: collections.deque[str] = collections.deque(maxlen=256)
        self.tokens_seen = 0  # counts appends to _recent: scrubbers rebuild on a change
        self._generation = creds.generation

    def clear(self) -> None:
        """Forget tokens and challenges (credentials changed)."""
        self._tokens.clear()
        self._challenges.clear()

    def token_values(self) -> list[str]:
        return list(self._recent)

    def forget(self, registry: str, scopes: frozenset[str]) -> None:
        self._tokens.pop((registry, scopes), None)

    def note_challenge(self, registry: str, header: str) -> None:
        """A 401 carried a (possibly new) challenge: remember it for the retry."""
        self._challenges[registry] = pick_challenge(header)

    async def challenge(self, registry: str) -> Challenge:
        self._creds.maybe_reload()  # a changed credential file drops what was learnt with it
        if self._creds.generation != self._generation:
            self._generation = self._creds.generation
            self.clear()
        known = self._challenges.get(registry)
        if known is not None:
            return known
        url = self._transport.base_url(registry) + "/v2/"
        try:
            async with self._transport.session.get(
                url, ssl=self._transport.ssl_for(registry), allow_redirects=False
            ) as resp:
                await resp.read()
                if resp.status == 401:
                    found = pick_challenge(resp.headers.get("WWW-Authenticate", ""))
                elif resp.status < 400:
                    found = OPEN
                else:
                    raise UpstreamUnavailable(
                        f"registry {registry} answered GET /v2/ with {resp.status}",
                        registry=registry,
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(
                f"registry {registry} is unreachable: {_describe(exc)}", registry=registry
            ) from exc
        self._challenges[registry] = found
        log.debug("registry %s challenge: %s", registry, found.scheme)
        return found

    async def header(
        self, registry: str, scopes: frozenset[str], *, force: bool = False
    ) -> str | None:
        """The Authorization value, or None when the registry needs none."""
        ch = await self.challenge(registry)
        if ch.scheme == "basic":
            cred = await self._creds.get(registry)
            if cred is None or not cred.password:
                return None
            return "Basic " + cred.basic()
        if ch.scheme != "bearer":
            return None
        key = (registry, scopes)
        tok = self._tokens.get(key)
        if tok is not None and not force and tok.expires > self.clock():
            # A cached token needs no credential lookup (a helper would run on every expiry
            # of its own cache, not the token's).
            return "Bearer " + tok.value
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            tok = self._tokens.get(key)
            # Another request may have fetched while we waited; a forced refresh still takes it
            # when it is newer than the token that failed (the caller passes force once).
            if tok is not None and tok.expires > self.clock() and not force:
                return "Bearer " + tok.value
            cred = await self._creds.get(registry)
            tok = await self._fetch(registry, ch, scopes, cred)
            if len(self._tokens) >= _MAX_TOKENS:
                self._prune()
            self._tokens[key] = tok
            self._recent.append(tok.value)
            self.tokens_seen += 1
            return "Bearer " + tok.value

    def _prune(self) -> None:
        """Every build brings new repositories (new scope sets): drop what has expired, then
        the oldest, so a long-running daemon keeps a bounded cache."""
        now = self.clock()
        for key in [k for k, t in self._tokens.items() if t.expires <= now]:
            del self._tokens[key]
            self._locks.pop(key, None)
        while len(self._tokens) >= _MAX_TOKENS:
            key = next(iter(self._tokens))
            del self._tokens[key]
            self._locks.pop(key, None)

    async def _fetch(
        self, registry: str, ch: Challenge, scopes: frozenset[str], cred: Credential | None
    ) -> _Token:
        realm = ch.params["realm"]
        if not realm.startswith(("https://", "http://")):
            raise UpstreamUnauthorized(
                f"registry {registry} named an invalid token realm", registry=registry
            )
        service = ch.params.get("service", "")
        ordered = sorted(scopes)
        session = self._transport.session
        try:
            if cred is not None and cred.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": cred.identity_token,
                    "service": service,
                    "scope": " ".join(ordered),
                    "client_id": "build-agent",
                }
                # The shared session skips automatic Content-Type (blobs pass through as sent).
                req = session.post(
                    realm,
                    data=form,
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                    allow_redirects=False,
                )
            else:
                params: list[tuple[str, str]] = [("service", service)] if service else []
                params += [("scope", s) for s in ordered]
                headers = {}
                if cred is not None and cred.password:
                    params.append(("account", cred.username))
                    headers["Authorization"] = "Basic " + cred.basic()
                req = session.get(realm, params=params, headers=headers, allow_redirects=False)
            async with req as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._metrics.token_fetches.labels("error").inc()
            raise UpstreamUnavailable(
                f"token server of registry {registry} is unreachable: {_describe(exc)}",
                registry=registry,
            ) from exc
        if status in (401, 403):
            self._metrics.token_fetches.labels("unauthorized").inc()
            who = "the proxy's credentials" if cred is not None else "anonymous access"
            raise UpstreamUnauthorized(
                f"token server of registry {registry} refused {who} ({status}); check the "
                "credentials in build.docker_config or [[proxy.credentials]]",
                registry=registry,
            )
        if status >= 400:
            self._metrics.token_fetches.labels("error").inc()
            raise UpstreamUnavailable(
                f"token server of registry {registry} answered {status}", registry=registry
            )
        try:
            data: Any = json.loads(body)
            value = str(data.get("token") or data.get("access_token") or "")
        except (ValueError, AttributeError):
            value = ""
        if not value:
            self._metrics.token_fetches.labels("error").inc()
            raise UpstreamUnavailable(
                f"token server of registry {registry} sent no token", registry=registry
            )
        self._metrics.token_fetches.labels("ok").inc()
        ttl = _lifetime(data, self._token_ttl)
        log.debug("token for %s (%d scopes) valid for %.0fs", registry, len(scopes), ttl)
        return _Token(value, self.clock() + ttl)


def _lifetime(data: dict[str, Any], default: float) -> float:
    """Seconds to keep a token: ``expires_in`` minus its age per ``issued_at``, minus a margin."""
    try:
        expires_in = float(data.get("expires_in") or default)
    except (TypeError, ValueError):
        expires_in = default
    age = 0.0
    issued = data.get("issued_at")
    if isinstance(issued, str):
        try:
            at = datetime.fromisoformat(issued.replace("Z", "+00:00"))
            age = time.time() - at.timestamp()
        except ValueError:
            age = 0.0
    # A skewed clock must not make every token look expired: trust at most half the lifetime.
    age = max(0.0, min(age, expires_in / 2))
    margin = min(10.0, expires_in * 0.1)
    return max(0.0, expires_in - age - margin)


def _describe(exc: BaseException) -> str:
    """A library error for a message: URL queries removed (a signed storage URL is a secret)."""
    text = str(exc) or type(exc).__name__
    return re.sub(r"\?[^\s'\"]*", "", text)[:200]
