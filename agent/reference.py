"""Image references and registry hosts, parsed the way Docker does: the one reference type of
the build side and the proxy (here, not in agent/proxy/, so that agent/build reaches the proxy
only through agent/contracts.py).

``parse("busybox")`` reads as ``docker.io/library/busybox:latest`` and keeps its spelling;
``parse("localhost:5000/a/b@sha256:..")`` keeps the port; the first path component is a
registry host only when it holds a ``.`` or a ``:``
or is ``localhost`` (distribution/reference ``splitDockerDomain``). Grammar from the OCI
distribution spec: repository components ``[a-z0-9]+([._-][a-z0-9]+)*``,
tags ``[\\w][\\w.-]{0,127}``, digests ``algorithm:encoded``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from agent.errors import BadRequest

DOCKER_HUB = "docker.io"
# Every name Docker treats as Docker Hub: references, config.json keys and the API endpoint.
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
HUB_API_HOST = "registry-1.docker.io"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]{32,}")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9-]+)*(?::[0-9]+)?")


@dataclass(frozen=True)
class Reference:
    """An image reference as written, and Docker's reading of it.

    ``repo``, ``tag`` and ``digest`` keep the caller's spelling (``tag`` is None when none was
    written; no ``docker.io/library/``): routes, records and messages use them, and ``str()``
    gives the text back. ``registry`` (canonical, see :func:`canonical_host`), ``repository``
    (``library/`` added on Docker Hub), ``ref`` and ``canonical`` are what a registry is asked.
    Built directly, ``repo`` must be a valid repository (as :func:`parse` checks).
    """

    repo: str
    tag: str | None = None
    digest: str | None = None

    @functools.cached_property
    def _split(self) -> tuple[str, str]:
        return split_repository(self.repo)

    @property
    def registry(self) -> str:
        return self._split[0]

    @property
    def repository(self) -> str:
        return self._split[1]

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def ref(self) -> str:
        """The tag or digest used in ``/v2/<repo>/manifests/<ref>`` (digest wins)."""
        return self.digest or self.tag or "latest"

    @property
    def canonical(self) -> str:
        """One spelling per image: ``busybox`` and ``index.docker.io/library/busybox:latest``
        are both ``docker.io/library/busybox:latest``."""
        tag = self.tag or ("" if self.digest else "latest")
        return _join(self.name, tag, self.digest)

    def __str__(self) -> str:
        return _join(self.repo, self.tag, self.digest)


def _join(name: str, tag: str | None, digest: str | None) -> str:
    out = name
    if tag:
        out += f":{tag}"
    if digest:
        out += f"@{digest}"
    return out


@functools.lru_cache(maxsize=1024)
def canonical_host(host: str) -> str:
    """The key under which a registry host is matched: lower case, no scheme, no path, no
    ``:443``, and every Docker Hub alias folded into ``docker.io`` (as Docker's config lookup)."""
    h = host.strip().lower()
    for scheme in ("https://", "http://"):
        if h.startswith(scheme):
            h = h[len(scheme) :]
    h = h.split("/", 1)[0]
    if h.endswith(":443"):
        h = h[: -len(":443")]
    if h in _HUB_ALIASES:
        return DOCKER_HUB
    return h


def api_host(host: str) -> str:
    """Where the registry API of ``host`` is served (Docker Hub's lives elsewhere)."""
    c = canonical_host(host)
    return HUB_API_HOST if c == DOCKER_HUB else c


def is_repository(path: str) -> bool:
    """True when ``path`` is a valid repository path (components joined by ``/``)."""
    return bool(path) and all(_COMPONENT.fullmatch(c) for c in path.split("/"))


def is_tag(ref: str) -> bool:
    return bool(_TAG.fullmatch(ref))


# The OCI image spec's registered algorithms fix their encoding; a registry asked for anything
# else answers 500 (docker-registry reads it as a tag), so the proxy refuses it as a bad path.
_REGISTERED = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}


def is_digest(ref: str) -> bool:
    if not _DIGEST.fullmatch(ref):
        return False
    algorithm, _, encoded = ref.partition(":")
    registered = _REGISTERED.get(algorithm)
    return registered is None or bool(registered.fullmatch(encoded))


def split_repository(name: str) -> tuple[str, str]:
    """``host/path`` -> (canonical host, path), with Docker's defaults for a bare name."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.fullmatch(first):
            raise BadRequest(f"{name!r} has an invalid registry host {first!r}")
        host, path = canonical_host(first), rest
    else:
        host, path = DOCKER_HUB, name
    if host == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not is_repository(path):
        raise BadRequest(
            f"{name!r} is not a valid repository: path components must be lower-case "
            "letters, digits and single separators (. _ -)"
        )
    return host, path


def parse(ref: str, *, what: str | None = None) -> Reference:
    """Parse ``[host[:port]/]path[:tag][@digest]``; raise :class:`BadRequest` naming the problem
    (and, with ``what``, which field held it)."""
    try:
        return _parse(ref)
    except BadRequest as exc:
        if what is None:
            raise
        raise BadRequest(
            f"{what} {ref!r} is not an image reference ({exc.message}); "
            "give e.g. registry.example.com/team/image:tag"
        ) from None


def _parse(ref: str) -> Reference:
    text = ref.strip()
    if not text:
        raise BadRequest("empty image reference; give e.g. registry.example.com/team/image:tag")
    name, at, digest = text.partition("@")
    if at and not is_digest(digest):
        raise BadRequest(f"{ref!r} has an invalid digest; expected e.g. sha256:<64 hex>")
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:  # a ':' after the last '/' is a tag, not a port
        name, tag = name[:colon], name[colon + 1 :]
        if not is_tag(tag):
            raise BadRequest(f"{ref!r} has an invalid tag {tag!r}")
    split_repository(name)  # raises on a bad host or path
    return Reference(name, tag, digest if at else None)


__all__ = [
    "DOCKER_HUB",
    "Reference",
    "api_host",
    "canonical_host",
    "is_digest",
    "is_repository",
    "is_tag",
    "parse",
    "split_repository",
]
