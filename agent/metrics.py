"""Prometheus metrics: the daemon's own series and the HTTP endpoint that serves them.

Everything is registered on the daemon's own registry (``app.registry``, never the global default
registry). The endpoint is a tiny aiohttp app on ``daemon.metrics_address`` (``""`` turns it off)
serving ``/metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from agent.errors import StartupError

_log = logging.getLogger("agent.daemon")

# Control requests are sub-millisecond; builds are not ours to time here.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0)


class DaemonMetrics:
    """The daemon's own series: its info metric and the control server's. Label children are
    cached because the request path is measured."""

    def __init__(self, registry: CollectorRegistry, version: str) -> None:
        reg = registry
        self._version = version
        self.info = Info("build_agent", "Version and toolchain of this daemon", registry=reg)
        self.set_info("none")
        self.requests = Counter(
            "build_agent_control_requests",
            "Control requests answered, by op and result code (ok or an error code)",
            ["op", "code"],
            registry=reg,
        )
        self.latency = Histogram(
            "build_agent_control_request_duration_seconds",
            "Time from a request's arrival to its reply, by op",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.connections = Gauge(
            "build_agent_control_connections",
            "Open control connections",
            registry=reg,
        )
        self.connections_total = Counter(
            "build_agent_control_connections_accepted",
            "Control connections accepted since start",
            registry=reg,
        )
        self.frame_errors = Counter(
            "build_agent_control_frame_errors",
            "Connections closed because of an invalid frame",
            registry=reg,
        )
        self._counted: dict[tuple[str, str], Counter] = {}
        self._timed: dict[str, Histogram] = {}

    def observe(self, op: str, code: str, seconds: float) -> None:
        key = (op, code)
        counter = self._counted.get(key)
        if counter is None:
            counter = self._counted[key] = self.requests.labels(op, code)
        counter.inc()
        hist = self._timed.get(op)
        if hist is None:
            hist = self._timed[op] = self.latency.labels(op)
        hist.observe(seconds)

    def set_info(self, toolchain: str) -> None:
        """``build_agent_info{version,toolchain} 1``; set again once the toolchain is known."""
        self.info.info({"version": self._version, "toolchain": toolchain})


_REGISTRY = web.AppKey("registry", CollectorRegistry)


async def _metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@asynccontextmanager
async def open_metrics(address: str, registry: CollectorRegistry) -> AsyncIterator[str | None]:
    """Serve ``registry`` at /metrics on ``address`` (``daemon.metrics_address``) for the daemon's
    lifetime; yields the bound ``host:port`` (None when off)."""
    if not address:
        _log.info("metrics endpoint off (daemon.metrics_address is empty)")
        yield None
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    web_app = web.Application()
    web_app[_REGISTRY] = registry
    web_app.router.add_get("/metrics", _metrics_handler)
    runner = web.AppRunner(web_app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, int(port), reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"metrics endpoint cannot listen on {address}: {exc.strerror}; "
                'choose a free daemon.metrics_address or set it to "" to turn metrics off'
            ) from exc
        bound = runner.addresses[0]
        where = f"{bound[0]}:{bound[1]}"
        _log.info("metrics on http://%s/metrics", where)
        yield where
    finally:
        await runner.cleanup()
