"""Resolving image references to manifest digests (the ``resolve`` op; mk3's ref cache).

A lookup is a HEAD of the manifest through the registry proxy, with the proxy's credentials
(:meth:`agent.contracts.RegistryPort.manifest_digest`). Results are cached for ``build.resolve_ttl``
seconds, keyed by the normalised reference (``busybox`` and ``docker.io/library/busybox:latest``
share an entry). Concurrent lookups of one reference share a single upstream request
(single-flight); a caller that gives up does not cancel it for the others. The refs in
``build.prefetch_refs`` are resolved again every ``build.prefetch_interval`` seconds in the
background, so lookups of them are answered from the cache.

A build request resolves every external image of its Dockerfile through it for the content key
(agent/build/keyed.py, ``make_lookup``, with ``max_age`` = ``build.from_max_age``); ref-only builds
ask the proxy directly (agent/build/flow.py). The daemon enters :func:`open_resolver` once and
keeps the resolver as ``app.resolver``.

Errors: a malformed reference is ``bad_request``; a reference that does not exist is
``not_found``; a registry that refuses or fails passes its own code (``upstream_unauthorized``,
``upstream_unavailable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from agent import reference
from agent.config import BuildConfig
from agent.contracts import RegistryPort
from agent.control.ops import Access, Args, Registry, RequestContext
from agent.errors import AgentError, BadRequest, InternalError, NotFound

log = logging.getLogger("agent.build")

_MAX_ENTRIES = 10_000
_PREFETCH_CONCURRENCY = 8


@dataclass(frozen=True)
class Resolved:
    ref: str  # normalised, e.g. "docker.io/library/busybox:latest"
    digest: str
    cached: bool  # answered from the cache (or joined a lookup already in flight)
    age: float  # seconds since the digest was fetched

    @property
    def pinned(self) -> str:
        """``<registry>/<repository>@<digest>``: the reference a build should use."""
        return f"{reference.parse(self.ref).name}@{self.digest}"


def normalise(ref: str) -> str:
    """The cache key of ``ref``; BadRequest (naming the problem) when it is not a reference."""
    if not isinstance(ref, str) or not ref.strip() or len(ref) > 1024 or ref != ref.strip():
        raise BadRequest(
            f"{ref!r} is not an image reference; give one like registry.example.com/team/img:tag",
            details={"field": "ref"},
        )
    return reference.parse(ref).canonical


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter(
            "build_agent_resolve_lookups",
            "Reference lookups by how they were answered: cache, joined (an upstream lookup "
            "already in flight), upstream, error",
            ["source"],
            registry=registry,
        )
        self.prefetch_errors = Counter(
            "build_agent_resolve_prefetch_errors",
            "Prefetched references that could not be resolved",
            registry=registry,
        )
        self.sources = {s: self.lookups.labels(s) for s in ("cache", "joined", "upstream", "error")}


class Resolver:
    """ref -> digest with a TTL cache, single-flight lookups and periodic prefetching."""

    def __init__(
        self,
        proxy: RegistryPort,
        *,
        ttl: float,
        prefetch_refs: Iterable[str] = (),
        prefetch_interval: float = 300.0,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proxy = proxy
        self.ttl = ttl
        self.prefetch_refs = list(prefetch_refs)
        self.prefetch_interval = prefetch_interval
        self._clock = clock
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[str]] = {}
        self._prefetcher: asyncio.Task[None] | None = None
        self.upstream_lookups = 0  # for tests and info
        self._m = _Metrics(registry or CollectorRegistry())

    # --- lookups ------------------------------------------------------------------------------

    async def resolve(self, ref: str) -> str:
        """The manifest digest of ``ref`` (``sha256:...``)."""
        return (await self.lookup(ref)).digest

    async def lookup(
        self, ref: str, *, fresh: bool = False, max_age: float | None = None
    ) -> Resolved:
        """``max_age``: accept a cached answer only that young (seconds; 0: ask the registry,
        joining a lookup of the same ref already in flight). Builds pass ``build.from_max_age``."""
        key = normalise(ref)
        now = self._clock()
        hit = self._cache.get(key)
        limit = self.ttl if max_age is None else min(self.ttl, max_age)
        if hit is not None and not fresh and now - hit[1] < limit:
            self._cache.move_to_end(key)
            self._m.sources["cache"].inc()
            return Resolved(key, hit[0], True, now - hit[1])
        task = self._inflight.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key), name=f"resolve {key}")
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        try:
            # shield: a caller that is cancelled must not cancel the lookup for the others
            digest = await asyncio.shield(task)
        except AgentError:
            self._m.sources["error"].inc()
            raise
        self._m.sources["joined" if joined else "upstream"].inc()
        fetched = self._cache.get(key, (digest, self._clock()))[1]
        return Resolved(key, digest, joined, max(0.0, self._clock() - fetched))

    def _forget(self, key: str, task: asyncio.Task[str]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here so an unjoined failure is not reported as lost

    async def _fetch(self, key: str) -> str:
        self.upstream_lookups += 1
        try:
            digest = await self.proxy.manifest_digest(key)
        except AgentError:
            raise
        except Exception as exc:  # a bug or an unexpected library error: say what was done
            raise InternalError(f"resolving {key} failed unexpectedly: {exc!r}") from exc
        if digest is None:
            registry = key.split("/", 1)[0]
            raise NotFound(
                f"{key} does not exist in {registry}: check the repository and tag",
                details={"ref": key, "registry": registry},
            )
        if self.ttl > 0:
            self._cache[key] = (digest, self._clock())
            self._cache.move_to_end(key)
            while len(self._cache) > _MAX_ENTRIES:
                self._cache.popitem(last=False)
        return digest

    # --- prefetch -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.prefetch_refs and self._prefetcher is None:
            self._prefetcher = asyncio.get_running_loop().create_task(
                self._prefetch_forever(), name="resolve prefetch"
            )

    async def close(self) -> None:
        task, self._prefetcher = self._prefetcher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for t in list(self._inflight.values()):
            t.cancel()

    async def prefetch_once(self) -> dict[str, str | None]:
        """Resolve every prefetch ref now (bypassing the cache); ref -> digest or None."""
        gate = asyncio.Semaphore(_PREFETCH_CONCURRENCY)

        async def one(ref: str) -> str | None:
            async with gate:
                try:
                    return (await self.lookup(ref, fresh=True)).digest
                except AgentError as exc:
                    self._m.prefetch_errors.inc()
                    log.warning("prefetch of %s failed: %s", ref, exc.message)
                    return None

        results = await asyncio.gather(*(one(r) for r in self.prefetch_refs))
        return dict(zip(self.prefetch_refs, results, strict=True))

    async def _prefetch_forever(self) -> None:
        while True:
            started = self._clock()
            got = await self.prefetch_once()
            ok = sum(1 for d in got.values() if d)
            log.info("prefetched %d of %d refs in %.2fs", ok, len(got), self._clock() - started)
            await asyncio.sleep(self.prefetch_interval)


@asynccontextmanager
async def open_resolver(
    config: BuildConfig, registry: CollectorRegistry, proxy: RegistryPort
) -> AsyncIterator[Resolver]:
    """A :class:`Resolver` asking ``proxy`` (``build.resolve_ttl``, ``build.prefetch_refs``,
    ``build.prefetch_interval``) for the daemon's lifetime, prefetching in the background."""
    resolver = Resolver(
        proxy,
        ttl=config.resolve_ttl,
        prefetch_refs=config.prefetch_refs,
        prefetch_interval=config.prefetch_interval,
        registry=registry,
    )
    resolver.start()
    try:
        yield resolver
    finally:
        await resolver.close()


async def resolve_op(ctx: RequestContext, args: Args) -> dict[str, Any]:
    """``{ref}`` -> ``{ref, digest, pinned, cached, age}``; ``ref`` is normalised."""
    args.only("ref")
    ref = args.string("ref", required=True)
    resolver = ctx.app.resolver
    if not isinstance(resolver, Resolver):
        raise InternalError(
            "resolve is unavailable: the daemon has no registry proxy to ask; check the [proxy] "
            "section and the daemon log"
        )
    got = await resolver.lookup(ref)
    return {
        "ref": got.ref,
        "digest": got.digest,
        "pinned": got.pinned,
        "cached": got.cached,
        "age": round(got.age, 3),
    }


def register(ops: Registry) -> None:
    ops.add("resolve", Access.READ, resolve_op)


__all__ = ["Resolved", "Resolver", "normalise", "open_resolver", "register"]
