"""The request handler: resolve the route, check the method, forward, stream the answer back.

Bodies are streamed both ways in the chunks the sockets deliver (bounded by the read buffers),
or spliced socket to socket where that is exact (_splice.py): nothing holds a whole blob.
Hop-by-hop headers (RFC 9110 7.6.1), the client's own credentials and the registry's challenges
are not forwarded; ``Location`` and ``Link`` are mapped back onto the proxy.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from urllib.parse import quote, unquote_plus

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from agent.errors import UpstreamError, UpstreamUnauthorized
from agent.proxy import _splice
from agent.proxy._access import HOST, Caller, HostToken, StaticRules
from agent.proxy._metrics import ProxyMetrics
from agent.proxy._routes import BUILD_SEGMENT, Resolved, Router, Target, api_path, denial
from agent.proxy._transport import Transport
from agent.proxy._uploads import Uploads
from agent.proxy._upstream import Outgoing, Upstream

log = logging.getLogger("agent.proxy")

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: the client's identity is the proxy's business, not the registry's.
_REQUEST_DROP = _HOP_BY_HOP | {"host", "authorization", "cookie", "expect"}
# Never returned: a challenge would send clients to the registry's token server.
_RESPONSE_DROP = _HOP_BY_HOP | {"www-authenticate", "set-cookie", "location", "server", "date"}
_API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
# Clients learn from the /v2/ ping that they may send a Basic credential: a build route's
# capability travels that way (docs/proxy.md). Mirror and static routes ignore it.
_CHALLENGE = 'Basic realm="build-agent registry proxy"'

_LINK_URL = re.compile(r"<([^>]*)>")
_SMALL = 4 << 20  # the largest manifest distribution accepts


def oci_error(status: int, code: str, message: str) -> web.Response:
    """An error in the distribution spec's shape (``{"errors": [{code, message, detail}]}``)."""
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]})
    headers = dict([_API_VERSION])
    if status == 401:
        headers["WWW-Authenticate"] = _CHALLENGE
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def login_of(request: web.BaseRequest) -> str | None:
    """The password of a Basic ``Authorization`` (a build route's capability), else None."""
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


def _actions(method: str) -> tuple[str, ...]:
    if method in ("GET", "HEAD"):
        return ("pull",)
    if method == "DELETE":
        return ("delete", "pull", "push")
    return ("pull", "push")


def _scope(target: Target, actions: tuple[str, ...]) -> str:
    return f"repository:{target.repository}:{','.join(actions)}"


class Forwarder:
    """The aiohttp handler (``web.Server(Forwarder(...))``)."""

    def __init__(
        self,
        router: Router,
        uploads: Uploads,
        upstream: Upstream,
        transport: Transport,
        metrics: ProxyMetrics,
        *,
        side: str,
        rules: StaticRules,
        host_token: HostToken | None = None,
    ) -> None:
        self._side = side
        self._rules = rules
        self._host_token = host_token
        self._router = router
        self._uploads = uploads
        self._upstream = upstream
        self._transport = transport
        self._metrics = metrics

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        kind = "none"
        resp: web.StreamResponse
        try:
            kind, resp = await self._handle(request)
        except UpstreamUnauthorized as exc:
            self._metrics.upstream_errors.labels("unauthorized").inc()
            resp = oci_error(401, "UNAUTHORIZED", exc.message)
        except UpstreamError as exc:
            resp = oci_error(503, "UNAVAILABLE", exc.message)
        status = resp.status
        self._metrics.served(kind, request.method, status, time.perf_counter() - started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s -> %d (%.1f ms)",
                request.method,
                request.path,
                status,
                (time.perf_counter() - started) * 1000,
            )
        return resp

    async def _handle(self, request: web.BaseRequest) -> tuple[str, web.StreamResponse]:
        raw_path, _, raw_query = request.raw_path.partition("?")
        raw_path = api_path(raw_path)
        method = request.method
        cap = login_of(request)
        caller = self._caller(cap)
        if raw_path in ("/v2", "/v2/"):
            if method not in ("GET", "HEAD"):
                return "base", oci_error(405, "UNSUPPORTED", "only GET and HEAD on /v2/")
            if not (caller.host_ok or self._router.is_build(cap)):
                # The challenge makes clients send their credential if they have one; one
                # without (a FROM pull through a mirror) carries on and is served regardless.
                return "base", oci_error(401, "UNAUTHORIZED", "build routes need a credential")
            return "base", web.Response(
                status=200, text="{}", content_type="application/json", headers=[_API_VERSION]
            )
        if not raw_path.startswith("/v2/"):
            return "none", oci_error(404, "NOT_FOUND", "not a registry API path")
        path = raw_path[len("/v2/") :]
        if "%" in path or "//" in path or "\\" in path:
            # No distribution API path needs an escape; %2F would smuggle a '/' past the router.
            return "none", oci_error(400, "NAME_INVALID", "escaped characters in the path")
        ns = request.query.get("ns") if "ns=" in raw_query else None
        res = self._router.resolve(path, ns, cap)
        if (
            self._side == HOST
            and not caller.host_ok
            and (res.target.kind != "build" if res is not None else not self._router.is_build(cap))
        ):
            # Any local user can connect here: only the token (or a build's own capability,
            # for its own routes) buys the proxy's credentials.
            return "none", oci_error(
                401, "UNAUTHORIZED", "the proxy's host listener needs its token (docs/proxy.md)"
            )
        if res is not None and res.target.kind == "static":
            route = res.name.partition("/")[0]
            if not self._rules.visible(route, caller):
                res = None  # not served to build children: as if it were not there
            elif (why := self._rules.write_denial(route, res.target, method, caller)) is not None:
                return res.target.kind, oci_error(403, "DENIED", why)
        if res is None:
            if path.startswith(BUILD_SEGMENT + "/") and not self._router.is_build(cap):
                return "none", oci_error(
                    401, "UNAUTHORIZED", "build routes need the credential of a running build"
                )
            return "none", oci_error(
                404, "NAME_UNKNOWN", "repository name not known to registry proxy"
            )
        why = denial(res, method)
        if why is not None:
            return res.target.kind, oci_error(403, "DENIED", why)
        return res.target.kind, await self._forward(request, res, raw_query, cap, caller)

    def _caller(self, cap: str | None) -> Caller:
        host_ok = (
            self._side == HOST and self._host_token is not None and self._host_token.matches(cap)
        )
        return Caller(self._side, host_ok, self._router.pushes_of(cap))

    async def _forward(
        self,
        request: web.BaseRequest,
        res: Resolved,
        raw_query: str,
        cap: str | None,
        caller: Caller,
    ) -> web.StreamResponse:
        t = res.target
        method = request.method
        scopes = {_scope(t, _actions(method))}
        query = raw_query
        if res.endpoint == "blobs/uploads" and res.ref:
            stored = self._uploads.lookup(res.ref, t.registry, t.repository)
            if stored is None:
                return oci_error(404, "BLOB_UPLOAD_UNKNOWN", "upload unknown to registry proxy")
            url = stored
        else:
            tail = f"/{res.ref}" if res.ref or res.endpoint == "blobs/uploads" else ""
            url = f"{self._transport.base_url(t.registry)}/v2/{t.repository}/{res.endpoint}{tail}"
        if query:
            query = self._rewrite_query(query, res, scopes, cap, caller)
        if query:
            url = f"{url}?{query}"

        drop = _REQUEST_DROP
        if "Connection" in request.headers:
            listed = {h.strip().lower() for h in request.headers["Connection"].split(",")}
            drop = drop | listed
        # A multidict: Go clients send one Accept line per media type.
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in drop
        )
        has_body = request.body_exists
        if has_body and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body: _splice.UploadBody | bytes | None = None
        length = request.content_length
        if has_body and res.endpoint == "manifests" and length is not None and length <= _SMALL:
            # A manifest is small: hold it so a 401 (rotated key) can be retried with a new token.
            body = await request.content.readexactly(length)
        elif has_body:
            body = _splice.UploadBody(request)
        retryable = method in ("GET", "HEAD") or (
            method == "POST" and res.endpoint == "blobs/uploads" and not has_body
        )
        out = Outgoing(
            registry=t.registry,
            method=method,
            url=url,
            headers=headers,
            scopes=frozenset(scopes),
            body=body,
            retryable=retryable,
        )
        try:
            up = await self._upstream.send(out)
        except UpstreamError:
            if isinstance(body, _splice.UploadBody) and body.took_over:
                _cut(request)  # part of the body left the socket behind aiohttp's back
            raise
        try:
            return await self._respond(
                request,
                res,
                up,
                url,
                close=isinstance(body, _splice.UploadBody) and body.took_over,
            )
        finally:
            up.release()
            self._metrics.bytes_up.inc(
                len(body) if isinstance(body, bytes) else body.count if body is not None else 0
            )

    def _rewrite_query(
        self, query: str, res: Resolved, scopes: set[str], cap: str | None, caller: Caller
    ) -> str:
        """Drop containerd's ``ns``; point a cross-repo mount's ``from`` at the upstream
        repository (and ask for pull on it), or drop the mount when it cannot be honoured."""
        pairs = query.split("&")
        keys = [unquote_plus(p.partition("=")[0]) for p in pairs]
        if "ns" not in keys and "from" not in keys:
            return query
        ns = None
        kept: list[str] = []
        src: Target | None = None
        for key, pair in zip(keys, pairs, strict=True):
            if key == "ns":
                ns = unquote_plus(pair.partition("=")[2])
        for key, pair in zip(keys, pairs, strict=True):
            if key == "ns":
                continue
            if key == "from":
                name = unquote_plus(pair.partition("=")[2])
                src = self._router.target_of(name, ns, cap)
                if (
                    src is None
                    or src.registry != res.target.registry
                    or not self._rules.source_allowed(src, name, caller)
                ):
                    src = None
                    continue
                kept.append("from=" + quote(src.repository, safe=""))
                scopes.add(_scope(src, ("pull",)))
                continue
            kept.append(pair)
        if src is None:  # an unknown source: a plain upload instead of a failing mount
            kept = [p for p in kept if unquote_plus(p.partition("=")[0]) != "mount"]
        return "&".join(kept)

    async def _respond(
        self,
        request: web.BaseRequest,
        res: Resolved,
        up: aiohttp.ClientResponse,
        sent_url: str,
        *,
        close: bool = False,
    ) -> web.StreamResponse:
        headers: CIMultiDict[str] = CIMultiDict()
        for k, v in up.headers.items():
            low = k.lower()
            if low == "link":  # tags/list and referrers pagination: <url>; rel="next"
                v = _LINK_URL.sub(lambda m: f"<{self._map_link(res, m[1], sent_url)}>", v)
            if low not in _RESPONSE_DROP:
                headers.add(k, v)
        location = up.headers.get("Location")
        if location:
            mapped = self._map_location(res, location, sent_url, up.status)
            if mapped is not None:
                headers["Location"] = mapped
        if (
            res.endpoint == "blobs/uploads"
            and res.ref
            and (up.status == 201 or (request.method == "DELETE" and up.status < 300))
        ):
            self._uploads.drop(res.ref)
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        if close:
            resp.force_close()
        spliced = _splice.eligible(request, up) if res.endpoint == "blobs" else None
        await resp.prepare(request)
        if spliced is not None:
            moved = 0
            try:
                moved = await _splice.splice_body(request, resp, up, spliced)
            except _splice.SpliceBroke as exc:
                moved = exc.moved
                self._broke_off(request, res, moved, str(exc))
                return resp
            finally:
                self._metrics.bytes_down.inc(moved)
            await resp.write_eof()
            return resp
        if request.method != "HEAD":
            moved = 0
            try:
                async for chunk in up.content.iter_any():
                    moved += len(chunk)
                    await resp.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._broke_off(request, res, moved, type(exc).__name__)
                return resp
            finally:
                self._metrics.bytes_down.inc(moved)
        await resp.write_eof()
        return resp

    def _broke_off(self, request: web.BaseRequest, res: Resolved, moved: int, why: str) -> None:
        # Headers are gone already: the only honest signal left is a cut connection.
        self._metrics.upstream_errors.labels("broke_off").inc()
        log.warning(
            "registry %s broke off a response after %d bytes: %s",
            res.target.registry,
            moved,
            why,
        )
        _cut(request)

    def _map_link(self, res: Resolved, target: str, sent_url: str) -> str:
        absolute = URL(sent_url).join(URL(target, encoded=True))
        prefix = f"/v2/{res.target.repository}/"
        if not absolute.raw_path.startswith(prefix):
            return target
        query = absolute.raw_query_string
        tail = absolute.raw_path[len(prefix) :]
        return f"/v2/{res.name}/{tail}" + (f"?{query}" if query else "")

    def _map_location(self, res: Resolved, location: str, sent_url: str, status: int) -> str | None:
        """The client-side URL for an upstream ``Location`` (absolute or relative)."""
        t = res.target
        absolute = URL(sent_url).join(URL(location))
        query = absolute.raw_query_string
        suffix = f"?{query}" if query else ""
        if res.endpoint == "blobs/uploads" and status == 202:
            upload_id = self._uploads.register(
                t.registry, t.repository, str(absolute.with_query(None).with_fragment(None))
            )
            return f"/v2/{res.name}/blobs/uploads/{upload_id}{suffix}"
        prefix = f"/v2/{t.repository}/"
        if absolute.raw_path.startswith(prefix):
            return f"/v2/{res.name}/{absolute.raw_path[len(prefix) :]}{suffix}"
        return None  # an upstream URL the client cannot use through the proxy


def _cut(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.close()
