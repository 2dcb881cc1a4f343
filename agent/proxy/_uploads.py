"""Upload sessions in flight: the proxy's opaque upload id -> the registry's upload URL.

A registry's ``Location`` for an upload may sit anywhere on its host (Google Artifact Registry's
are not under ``/v2/``). The client gets ``/v2/<its repo>/blobs/uploads/<id>?<query>`` instead;
the id is random and bound to the upstream repository it was made for, so a sandboxed client
cannot aim the proxy's credentials at a URL of its own choosing.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class _Upload:
    registry: str
    repository: str
    url: str  # absolute, without query
    created: float


class Uploads:
    def __init__(self, *, capacity: int = 4096, ttl: float = 24 * 3600.0) -> None:
        self._by_id: OrderedDict[str, _Upload] = OrderedDict()
        self._by_url: dict[str, str] = {}
        self._capacity = capacity
        self._ttl = ttl

    def __len__(self) -> int:
        return len(self._by_id)

    def register(self, registry: str, repository: str, url: str) -> str:
        known = self._by_url.get(url)
        if known is not None and known in self._by_id:
            self._by_id.move_to_end(known)
            return known
        upload_id = secrets.token_hex(16)
        self._by_id[upload_id] = _Upload(registry, repository, url, time.monotonic())
        self._by_url[url] = upload_id
        self._evict()
        return upload_id

    def lookup(self, upload_id: str, registry: str, repository: str) -> str | None:
        up = self._by_id.get(upload_id)
        if up is None or up.registry != registry or up.repository != repository:
            return None
        if time.monotonic() - up.created > self._ttl:
            self.drop(upload_id)
            return None
        return up.url

    def drop(self, upload_id: str) -> None:
        up = self._by_id.pop(upload_id, None)
        if up is not None:
            self._by_url.pop(up.url, None)

    def _evict(self) -> None:
        while len(self._by_id) > self._capacity:
            _, up = self._by_id.popitem(last=False)
            self._by_url.pop(up.url, None)
