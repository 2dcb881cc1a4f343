"""The buildkitd stand-in's registry client: which hosts BuildKit asks for an image, in which URL
form, and the pull and push it then does, per BuildKit version.

REAL (read in BuildKit's ``util/resolver/resolver.go`` and the containerd ``remotes/docker`` it
vendors: containerd 1.6.20 in v0.11.6, containerd v2 in v0.24.0; and seen on the wire, see
``tests/fixtures/toolchain/mirror-*-requests.txt``):

- hosts: each ``mirrors`` entry of the image's registry in order, then the registry itself
  (``docker.io`` is asked as ``registry-1.docker.io``);
- a mirror with a path: v0.11.6 puts the whole string in the URL's host and ``/v2`` after it
  (``/mirror/x/v2/<repo>/...``) and takes its settings from ``[registry."<whole string>"]``;
  v0.24.0 sends ``/v2/mirror/x/<repo>/...`` and takes them from ``[registry."<host>"]``;
- every request to a host that is not the image's registry carries ``?ns=<registry>``;
- schemes: v0.11.6 asks over plain HTTP when ``http`` is set (or the host is localhost and
  ``http`` is unset), and *also* over HTTPS when ``insecure`` is set; v0.24.0 asks once, over
  HTTPS with a fall back to HTTP when both are set, else as v0.11.6 does;
- resolving: a 404 moves on to the next host, and so does any other failure, whose error is kept;
  when every host failed, the first kept error is the answer, else ``<ref>: not found``;
- the error texts: ``failed to do request: Head "<url>": <why>`` and ``unexpected status from HEAD
  request to <url>: <status>``.

A SIMPLIFICATION: the pull and the push copy the base image's manifest and blobs as they are (no
layer is built), single-platform manifests only, whole blobs in memory (the test images are a few
MiB); the push authenticates with Basic only.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

_MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)


class RegistryError(Exception):
    """A request failed the way containerd reports it (``str(exc)`` is its message)."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Host:
    scheme: str  # https, http, or "https+http" (v0.24: HTTPS, HTTP when TLS fails)
    host: str  # what the URL's authority is given (v0.11.6: a mirror's whole string)
    path: str  # "/v2" or "/v2/<mirror path>"
    ns: str | None  # the ?ns= value, for a host that is not the image's own registry

    def url(self, repo: str, tail: str) -> str:
        query = "?" + urllib.parse.urlencode({"ns": self.ns}) if self.ns else ""
        scheme = "https" if self.scheme == "https+http" else self.scheme
        return f"{scheme}://{self.host}{self.path}/{repo}/{tail}{query}"


def _is_localhost(host: str) -> bool:
    name = host.split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    return name in ("localhost", "127.0.0.1", "::1")


def _schemes(host: str, settings: dict[str, Any], version: str) -> list[str]:
    plain = settings.get("http")
    is_http = bool(plain) if plain is not None else _is_localhost(host)
    insecure = bool(settings.get("insecure"))
    if version == "v0.11.6":
        out = (["http"] if is_http else []) + (["https"] if insecure else [])
        return out or ["https"]
    if insecure:
        return ["https+http" if is_http else "https"]
    return ["http" if is_http else "https"]


def hosts(registries: dict[str, dict[str, Any]], registry: str, version: str) -> list[Host]:
    """The hosts BuildKit ``version`` asks, in order, for an image on ``registry``."""
    conf = registries.get(registry, {})
    out: list[Host] = []
    for mirror in conf.get("mirrors", []):
        if version == "v0.11.6":
            host, path, settings = mirror, "/v2", registries.get(mirror, {})
        else:
            host, _, rest = mirror.partition("/")
            path = "/v2" + (f"/{rest.strip('/')}" if rest.strip("/") else "")
            settings = registries.get(host, {})
        out += [Host(s, host, path, registry) for s in _schemes(host, settings, version)]
    own = "registry-1.docker.io" if registry == "docker.io" else registry
    out += [Host(s, own, "/v2", None) for s in _schemes(own, conf, version)]
    return out


def _request(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    *,
    fallback: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        ctx = ssl.create_default_context()
        conn = http.client.HTTPSConnection(parts.netloc, timeout=30, context=ctx)
    else:
        conn = http.client.HTTPConnection(parts.netloc, timeout=30)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    except ssl.SSLError as exc:
        if fallback:
            return _request(method, "http" + url[len("https") :], headers, body)
        if "WRONG_VERSION_NUMBER" in str(exc) or "wrong version" in str(exc):
            why = "http: server gave HTTP response to HTTPS client"
        else:
            why = f"tls: {exc.reason or exc}"
        raise RegistryError(f'failed to do request: {method.title()} "{url}": {why}') from exc
    except ConnectionRefusedError as exc:
        raise RegistryError(
            f'failed to do request: {method.title()} "{url}": dial tcp {parts.netloc}: '
            "connect: connection refused"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise RegistryError(f'failed to do request: {method.title()} "{url}": {exc}') from exc
    finally:
        conn.close()


def _status_text(status: int) -> str:
    return f"{status} {http.client.responses.get(status, '')}".strip()


@dataclass(frozen=True)
class Resolved:
    host: Host
    repo: str
    digest: str
    manifest: bytes
    media_type: str


def resolve(
    registries: dict[str, dict[str, Any]], registry: str, repo: str, tag: str, version: str
) -> Resolved:
    """The manifest of ``registry/repo:tag`` from the first host that has it."""
    first: RegistryError | None = None
    for h in hosts(registries, registry, version):
        url = h.url(repo, f"manifests/{tag}")
        try:
            status, headers, _ = _request(
                "HEAD", url, {"Accept": _MANIFEST_TYPES}, fallback=h.scheme == "https+http"
            )
        except RegistryError as exc:
            first = first or exc
            continue
        if status == 404:
            continue
        if status > 299:
            first = first or RegistryError(
                f"unexpected status from HEAD request to {url}: {_status_text(status)}",
                status=status,
            )
            continue
        status, headers, body = _request(
            "GET", url, {"Accept": _MANIFEST_TYPES}, fallback=h.scheme == "https+http"
        )
        if status != 200:
            raise RegistryError(
                f"unexpected status from GET request to {url}: {_status_text(status)}"
            )
        digest = headers.get("docker-content-digest") or (
            "sha256:" + hashlib.sha256(body).hexdigest()
        )
        media = headers.get("content-type", "") or json.loads(body).get("mediaType", "")
        return Resolved(h, repo, digest, body, media)
    if first is not None:
        raise first
    raise RegistryError(f"{registry}/{repo}:{tag}: not found", status=404)


def pull_blob(src: Resolved, digest: str) -> bytes:
    url = src.host.url(src.repo, f"blobs/{digest}")
    status, headers, body = _request("GET", url, fallback=src.host.scheme == "https+http")
    for _ in range(3):  # a registry may redirect a blob to its storage
        if status not in (301, 302, 307, 308):
            break
        status, headers, body = _request("GET", urllib.parse.urljoin(url, headers["location"]))
    if status != 200:
        raise RegistryError(f"unexpected status from GET request to {url}: {_status_text(status)}")
    return body


class Pusher:
    """Pushes blobs and a manifest to ``<scheme>://<host>/v2/<repo>``; Basic login when asked."""

    def __init__(self, scheme: str, host: str, repo: str, auths: dict[str, Any], version: str):
        self.base = f"{scheme}://{host}/v2/{repo}"
        self.version = version
        entry = auths.get(host) or {}
        self.auth = {"Authorization": f"Basic {entry['auth']}"} if entry.get("auth") else {}

    def _do(self, method: str, url: str, headers: dict[str, str], body: bytes | None = None) -> Any:
        status, got, data = _request(method, url, headers, body)
        if status == 401 and self.auth:
            status, got, data = _request(method, url, {**headers, **self.auth}, body)
        return status, got, data

    def _fail(self, method: str, url: str, status: int, name: str) -> RegistryError:
        if self.version == "v0.11.6":
            why = f"unexpected status: {_status_text(status)}"
        else:
            why = f"unexpected status from {method} request to {url}: {_status_text(status)}"
        return RegistryError(f"failed to push {name}: {why}", status=status)

    def blob(self, digest: str, data: bytes, name: str) -> None:
        url = f"{self.base}/blobs/{digest}"
        status, _, _ = self._do("HEAD", url, {})
        if status == 200:
            return
        if status != 404:
            raise self._fail("HEAD", url, status, name)
        start = f"{self.base}/blobs/uploads/"
        status, got, _ = self._do("POST", start, {"Content-Length": "0"}, b"")
        if status != 202:
            raise self._fail("POST", start, status, name)
        where = urllib.parse.urljoin(start, got["location"])
        where += ("&" if "?" in where else "?") + urllib.parse.urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
        status, _, _ = self._do("PUT", where, headers, data)
        if status != 201:
            raise self._fail("PUT", where, status, name)

    def manifest(self, tag: str, body: bytes, media_type: str, name: str) -> None:
        url = f"{self.base}/manifests/{tag}"
        headers = {"Content-Type": media_type, "Content-Length": str(len(body))}
        status, _, _ = self._do("PUT", url, headers, body)
        if status != 201:
            raise self._fail("PUT", url, status, name)


def copy_image(src: Resolved, dest: str, auths: dict[str, Any], plain: bool, version: str) -> str:
    """Push ``src`` as it is to ``dest`` (``host/repo:tag``); returns the manifest's digest."""
    host, _, rest = dest.partition("/")
    repo, _, tag = rest.rpartition(":")
    pusher = Pusher("http" if plain else "https", host, repo, auths, version)
    manifest = json.loads(src.manifest)
    for desc in [manifest.get("config", {}), *manifest.get("layers", [])]:
        if desc.get("digest"):
            pusher.blob(desc["digest"], pull_blob(src, desc["digest"]), dest)
    pusher.manifest(tag, src.manifest, src.media_type, dest)
    return "sha256:" + hashlib.sha256(src.manifest).hexdigest()
