"""The proxy's Prometheus metrics, registered on the App's registry. Labels are closed sets (route
kind, method, status class, result): never a repository, a credential or a capability."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_METHODS = frozenset({"GET", "HEAD", "POST", "PATCH", "PUT", "DELETE", "OPTIONS"})
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "build_agent_proxy_requests_total",
            "Requests served by the registry proxy",
            ["route", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "build_agent_proxy_request_duration_seconds",
            "Time from request to the last byte of the response",
            ["route", "method"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "build_agent_proxy_upstream_latency_seconds",
            "Time until an upstream registry answered with headers",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.bytes = Counter(
            "build_agent_proxy_bytes_total",
            "Body bytes moved: direction=up (client to registry) or down (registry to client)",
            ["direction"],
            registry=registry,
        )
        self.token_fetches = Counter(
            "build_agent_proxy_token_fetches_total",
            "Bearer token requests to token servers, by result",
            ["result"],
            registry=registry,
        )
        self.retries = Counter(
            "build_agent_proxy_retries_total",
            "Upstream requests retried, by reason (connect, status code)",
            ["reason"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "build_agent_proxy_upstream_errors_total",
            "Upstream failures the client saw as an error, by kind",
            ["kind"],
            registry=registry,
        )
        self.bytes_up = self.bytes.labels("up")
        self.bytes_down = self.bytes.labels("down")
        self._latency: dict[str, Histogram] = {}
        self._served: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def upstream_answered(self, method: str, seconds: float) -> None:
        child = self._latency.get(method)
        if child is None:  # methods reaching upstream passed denial(): a closed set
            child = self._latency[method] = self.upstream_latency.labels(method)
        child.observe(seconds)

    def served(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one request (labelled children cached: this runs on every request)."""
        if method not in _METHODS:
            method = "OTHER"  # a client picks the method: keep the label set closed
        key = (route, method, status // 100)
        pair = self._served.get(key)
        if pair is None:
            pair = (
                self.requests.labels(route, method, status_class(status)),
                self.duration.labels(route, method),
            )
            self._served[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)


def status_class(status: int) -> str:
    return f"{status // 100}xx"
