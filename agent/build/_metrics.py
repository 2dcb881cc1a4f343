"""The build manager's Prometheus series (registered on ``app.registry``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.build.storage import StorageReport

_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class BuildMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self.started = Counter(
            "build_agent_builds_started",
            "Builds that left the queue and started running",
            registry=registry,
        )
        self.finished = Counter(
            "build_agent_builds_finished",
            "Builds that reached a final state, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.phase = Histogram(
            "build_agent_build_phase_duration_seconds",
            "Time spent per build phase (context, queue, base_check, context_copy, base_build, "
            "workspace_check, copy, verify, total)",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=registry,
        )
        self.queued = Gauge(
            "build_agent_builds_queued", "Builds waiting for a slot", registry=registry
        )
        self.active = Gauge("build_agent_builds_active", "Builds running now", registry=registry)
        self.cache_hits = Counter(
            "build_agent_build_cache_hits",
            "Images found upstream and not rebuilt, by kind (base, workspace)",
            ["kind"],
            registry=registry,
        )
        self.dedupe_joins = Counter(
            "build_agent_build_dedupe_joins",
            "Requests that joined a queued or running build of the same target",
            registry=registry,
        )
        self.busy = Counter(
            "build_agent_builds_refused_busy",
            "Build requests refused because the queue was full",
            registry=registry,
        )
        self.tool_runs = Counter(
            "build_agent_toolchain_runs",
            "Toolchain invocations, by kind (build, copy)",
            ["kind"],
            registry=registry,
        )
        self.base_cache = Counter(
            "build_agent_base_cache",
            "Dockerfile builds by base cache result (hit, miss) and reason: a hit is 'unchanged'; "
            "a miss counts once per reason it has (first, forced, unknown, dockerfile, "
            "from_moved, args, context, other)",
            ["result", "reason"],
            registry=registry,
        )
        self.base_cache.labels("hit", "unchanged")
        for reason in ("first", "forced", "unknown", "dockerfile", "from_moved", "args",
                       "context", "other"):
            self.base_cache.labels("miss", reason)
        for outcome in ("succeeded", "failed", "cancelled", "timed_out", "interrupted"):
            self.finished.labels(outcome)
        for kind in ("base", "workspace"):
            self.cache_hits.labels(kind)
        for kind in ("build", "copy"):
            self.tool_runs.labels(kind)

    def watch_storage(self, report: Callable[[], StorageReport]) -> None:
        """Expose the toolchain's storage (read from ``report`` at each scrape)."""
        self._registry.register(StorageCollector(report))


class StorageCollector(Collector):
    """The toolchain's storage, read at scrape time from its StorageReport."""

    def __init__(self, report: Callable[[], StorageReport]) -> None:
        self._report = report

    def collect(self) -> Iterator[Metric]:
        r = self._report()
        labels = ["driver"]
        used = GaugeMetricFamily(
            "build_agent_storage_used_bytes",
            "Disk the toolchain's local storage uses now (buildah's image store, BuildKit's root)",
            labels=labels,
        )
        used.add_metric([r.driver], r.used_bytes)
        budget = GaugeMetricFamily(
            "build_agent_storage_max_bytes",
            "The storage budget, build.storage_max (0: none)",
            labels=labels,
        )
        budget.add_metric([r.driver], r.max_bytes)
        freed = CounterMetricFamily(
            "build_agent_storage_reclaimed_bytes",
            "Disk the toolchain's storage upkeep freed (removed images, prunes)",
            labels=labels,
        )
        freed.add_metric([r.driver], r.reclaimed_bytes)
        yield from (used, budget, freed)
