"""Resolve benchmark: the Resolver over the real proxy and a real docker-registry on loopback.

Measures
  1. a cold lookup (HEAD through the proxy to the registry) and a warm one (TTL cache), p50;
  2. 100 concurrent cold lookups of one ref: wall time and how many upstream requests were made
     (single-flight: 1);
  3. the BuildKit supervisor with the stand-in buildkitd: start to RUNNING, and SIGKILL to RUNNING
     again with the default policy (1 s first backoff, minus up to 20 % jitter).

Prints the figures; nothing is written.

    .venv/bin/python bench/resolve.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry  # noqa: E402

from agent.build._supervisor import Policy, State  # noqa: E402
from agent.build.buildkit import BuildkitBinaries, BuildkitToolchain  # noqa: E402
from agent.build.resolve import Resolver  # noqa: E402
from agent.config import Config, DaemonConfig, ProxyConfig, RegistryConfig  # noqa: E402
from agent.proxy import open_proxy  # noqa: E402
from agent.sandbox import OffSandbox  # noqa: E402
from tests.infra.images import make_busybox_image  # noqa: E402
from tests.infra.registry import free_port, start_registry  # noqa: E402
from tests.standins import install  # noqa: E402


async def resolve_figures(tmp: Path) -> None:
    reg = start_registry(tmp / "registry")
    try:
        ref = f"{reg.host}/busybox:latest"
        make_busybox_image(tmp / "buildah", ref)
        cfg = Config(
            proxy=ProxyConfig(
                port=free_port(),
                host_address="",  # resolving needs no host listener
                registries=[RegistryConfig(host=reg.host, http=True)],
            )
        )
        async with open_proxy(cfg, CollectorRegistry(), OffSandbox()) as proxy:
            cold: list[float] = []
            warm: list[float] = []
            for _ in range(50):
                r = Resolver(proxy, ttl=60)
                t = time.perf_counter()
                await r.resolve(ref)
                cold.append(time.perf_counter() - t)
                t = time.perf_counter()
                await r.resolve(ref)
                warm.append(time.perf_counter() - t)
            print(f"cold lookup p50 {statistics.median(cold) * 1000:.2f} ms (n=50)")
            print(f"warm lookup p50 {statistics.median(warm) * 1e6:.1f} us (n=50)")
            r = Resolver(proxy, ttl=60)
            t = time.perf_counter()
            await asyncio.gather(*(r.resolve(ref) for _ in range(100)))
            wall = time.perf_counter() - t
            print(
                f"100 concurrent cold lookups: {wall * 1000:.2f} ms, "
                f"{r.upstream_lookups} upstream request(s)"
            )
    finally:
        reg.stop()


async def supervisor_figures(tmp: Path) -> None:
    s = install(tmp / "bin")
    bins = BuildkitBinaries(s.path("buildkitd"), s.path("buildctl"), s.path("crane"))
    daemon = DaemonConfig(state_dir=str(tmp / "state"), runtime_dir=str(tmp / "run"))
    tc = BuildkitToolchain(
        state_dir=daemon.state_dir,
        runtime_dir=daemon.runtime_dir,
        registry=CollectorRegistry(),
        sandbox=OffSandbox(),
        proxy=None,
        binaries=bins,
        policy=Policy(),
        cleanup=lambda pidfile, root: None,
    )
    t = time.perf_counter()
    await tc.start()
    print(f"stand-in buildkitd start -> RUNNING: {(time.perf_counter() - t) * 1000:.0f} ms")
    old = tc.supervisor.pid
    assert old is not None
    t = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    sup = tc.supervisor
    await sup.wait_until(lambda: sup.state is State.RUNNING and sup.pid != old, 30)
    print(f"SIGKILL -> RUNNING again (default policy): {(time.perf_counter() - t) * 1000:.0f} ms")
    await tc.close()


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-resolve-", dir="/tmp") as d:
        await resolve_figures(Path(d))
        await supervisor_figures(Path(d))


if __name__ == "__main__":
    asyncio.run(main())
