"""The resolver: against the RegistryPort contract (a scripted port), through the real proxy to a
real registry, and through the real daemon with ``agentctl resolve``."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.build.resolve import Resolver, normalise
from agent.errors import BadRequest, NotFound, UpstreamUnauthorized, UpstreamUnavailable
from tests.infra.daemon import DaemonProcess
from tests.infra.proxy_harness import (  # noqa: F401  (fixtures)
    PASSWORD,
    USER,
    ProxyFactory,
    htpasswd_registry,
    make_proxy,
)
from tests.infra.registry import Registry

DIGEST = "sha256:" + "ab" * 32


class ScriptedPort:
    """A RegistryPort whose manifest_digest answers from ``table`` (a digest, None, or an
    exception), optionally holding every lookup until ``gate`` is set."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.table = table
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def manifest_digest(self, ref: str) -> str | None:
        self.calls.append(ref)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        answer = self.table[ref]
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _metric(reg: CollectorRegistry, source: str) -> float:
    return reg.get_sample_value("build_agent_resolve_lookups_total", {"source": source}) or 0.0


def test_normalise_folds_docker_hub_and_rejects_garbage() -> None:
    assert normalise("busybox") == "docker.io/library/busybox:latest"
    assert normalise("index.docker.io/library/busybox:latest") == normalise("busybox")
    assert normalise("localhost:5000/a/b:1") == "localhost:5000/a/b:1"
    for bad in ("", " busybox", "UPPER/case", "a b", "x" * 2000):
        with pytest.raises(BadRequest):
            normalise(bad)


async def test_ttl_cache_counts_and_expiry() -> None:
    port = ScriptedPort({"docker.io/library/busybox:latest": DIGEST})
    reg = CollectorRegistry()
    clock = Clock()
    r = Resolver(port, ttl=60, registry=reg, clock=clock)  # type: ignore[arg-type]
    first = await r.lookup("busybox")
    assert (first.digest, first.cached) == (DIGEST, False)
    assert first.pinned == f"docker.io/library/busybox@{DIGEST}"
    clock.now += 59
    again = await r.lookup("docker.io/library/busybox:latest")
    assert again.cached and again.age == pytest.approx(59)
    assert port.calls == ["docker.io/library/busybox:latest"]
    clock.now += 2  # past the TTL
    assert await r.resolve("busybox") == DIGEST
    assert len(port.calls) == 2
    assert (_metric(reg, "cache"), _metric(reg, "upstream")) == (1, 2)


async def test_ttl_zero_never_caches() -> None:
    port = ScriptedPort({"docker.io/library/busybox:latest": DIGEST})
    r = Resolver(port, ttl=0)  # type: ignore[arg-type]
    await r.resolve("busybox")
    await r.resolve("busybox")
    assert len(port.calls) == 2


async def test_concurrent_lookups_share_one_upstream_request() -> None:
    port = ScriptedPort({"docker.io/library/busybox:latest": DIGEST})
    port.gate = asyncio.Event()
    reg = CollectorRegistry()
    r = Resolver(port, ttl=60, registry=reg)  # type: ignore[arg-type]
    tasks = [asyncio.create_task(r.lookup("busybox")) for _ in range(20)]
    await port.entered.wait()
    # One caller gives up: the lookup goes on for the others.
    tasks[0].cancel()
    port.gate.set()
    results = await asyncio.gather(*tasks[1:])
    assert port.calls == ["docker.io/library/busybox:latest"]
    assert {x.digest for x in results} == {DIGEST}
    # tasks[0] started the lookup and was cancelled: the 19 others joined it.
    assert _metric(reg, "joined") == 19 and r.upstream_lookups == 1
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]


async def test_errors_keep_their_codes_and_are_not_cached() -> None:
    port = ScriptedPort(
        {
            "r.example/missing:1": None,
            "r.example/locked:1": UpstreamUnauthorized("refused", registry="r.example"),
            "r.example/down:1": UpstreamUnavailable("down", registry="r.example"),
        }
    )
    r = Resolver(port, ttl=60)  # type: ignore[arg-type]
    with pytest.raises(NotFound) as missing:
        await r.resolve("r.example/missing:1")
    assert "r.example/missing:1 does not exist in r.example" in missing.value.message
    with pytest.raises(UpstreamUnauthorized):
        await r.resolve("r.example/locked:1")
    with pytest.raises(UpstreamUnavailable):
        await r.resolve("r.example/down:1")
    port.table["r.example/missing:1"] = DIGEST  # pushed meanwhile: no negative caching
    assert await r.resolve("r.example/missing:1") == DIGEST


async def test_prefetch_runs_periodically_and_warms_the_cache() -> None:
    port = ScriptedPort({"r.example/a:1": DIGEST, "r.example/gone:1": None})
    reg = CollectorRegistry()
    r = Resolver(
        port,  # type: ignore[arg-type]
        ttl=3600,
        prefetch_refs=["r.example/a:1", "r.example/gone:1"],
        prefetch_interval=0.05,
        registry=reg,
    )
    rounds = asyncio.Event()
    real = port.manifest_digest

    async def counting(ref: str) -> str | None:
        if port.calls.count("r.example/a:1") >= 3:
            rounds.set()
        return await real(ref)

    port.manifest_digest = counting  # type: ignore[method-assign]
    r.start()
    try:
        await asyncio.wait_for(rounds.wait(), 10)
    finally:
        await r.close()
    upstream = len(port.calls)
    got = await r.lookup("r.example/a:1")
    assert got.cached and len(port.calls) == upstream  # answered from the warmed cache
    assert (reg.get_sample_value("build_agent_resolve_prefetch_errors_total") or 0) >= 3


# --- through the real proxy ---------------------------------------------------------------------


async def test_resolve_through_the_real_proxy(
    make_proxy: ProxyFactory,  # noqa: F811
    registry: Registry,
    base_image: str,
    htpasswd_registry: Registry,  # noqa: F811
) -> None:
    h = await make_proxy(
        http_hosts=[registry.host, htpasswd_registry.host],
        credentials=[(htpasswd_registry.host, USER, PASSWORD)],
    )
    r = Resolver(h.proxy, ttl=60)
    digest = await r.resolve(base_image)
    assert digest.startswith("sha256:") and len(digest) == 71
    with pytest.raises(NotFound):
        await r.resolve(f"{registry.host}/no-such-repo:1")
    # The proxy's credentials are used: the htpasswd registry answers (404, not 401).
    with pytest.raises(NotFound):
        await r.resolve(f"{htpasswd_registry.host}/nothing:here")
    bare = await make_proxy(http_hosts=[htpasswd_registry.host])
    with pytest.raises(UpstreamUnauthorized):
        await Resolver(bare.proxy, ttl=60).resolve(f"{htpasswd_registry.host}/nothing:here")


# --- through the real daemon -------------------------------------------------------------------


@pytest.fixture
def daemon(short_tmp: Path, registry: Registry) -> Iterator[DaemonProcess]:
    d = DaemonProcess(
        short_tmp,
        {
            "build": {"toolchain": "buildah", "resolve_ttl": 60},
            "proxy": {"registries": [{"host": registry.host, "http": True}]},
        },
    )
    try:
        d.start(timeout=30)
        yield d
    finally:
        d.cleanup()


def _skopeo_digest(ref: str) -> str:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}", f"docker://{ref}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_agentctl_resolve_through_the_daemon(
    daemon: DaemonProcess, registry: Registry, base_image: str
) -> None:
    want = _skopeo_digest(base_image)
    plain = daemon.ctl("resolve", base_image)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == f"{base_image.rsplit(':', 1)[0]}@{want}"
    as_json = daemon.ctl("resolve", base_image, "--json")
    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["digest"] == want and result["cached"] is True
    missing = daemon.ctl("resolve", f"{registry.host}/no-such:1")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    bad = daemon.ctl("resolve", "Not A Ref", "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["code"] == "bad_request"
    assert "'Not A Ref' is not a valid repository" in bad.stderr


async def test_max_age_limits_cached_answers_and_keeps_single_flight() -> None:
    """build.from_max_age: 0 asks the registry every time (joining a lookup in flight); a
    larger value takes a cached answer that young, never older than resolve_ttl."""
    ref = "localhost:5000/a:1"
    port = ScriptedPort({ref: DIGEST})
    clock = Clock()
    r = Resolver(port, ttl=60, clock=clock)  # type: ignore[arg-type]
    await r.lookup(ref)
    clock.now += 5
    assert (await r.lookup(ref, max_age=10)).cached
    assert len(port.calls) == 1
    fresh = await r.lookup(ref, max_age=0)
    assert not fresh.cached and len(port.calls) == 2
    clock.now += 4
    assert not (await r.lookup(ref, max_age=3)).cached and len(port.calls) == 3
    clock.now += 100
    assert not (await r.lookup(ref, max_age=1000)).cached  # the TTL still bounds it
    port.gate = asyncio.Event()
    many = [asyncio.ensure_future(r.lookup(ref, max_age=0)) for _ in range(5)]
    await port.entered.wait()
    port.gate.set()
    got = await asyncio.gather(*many)
    assert {g.digest for g in got} == {DIGEST} and len(port.calls) == 5
