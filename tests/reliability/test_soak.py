"""Control-plane soak: many clients x many requests (ping, info, status, list, logs, and followed
log streams) at once. No error, every stream complete, fds back to baseline, p99 printed.

Default 50 clients x 200 requests; RELIABILITY_SCALE=full runs 100 x 1000 (bench/soak.py
publishes the full-size figures in docs/performance.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.infra.builds import write_context
from tests.infra.registry import Registry
from tests.reliability._support import (
    run_build,
    scale,
    settled_census,
    settled_rss_kb,
    standin_daemon,
)
from tests.reliability.soak import run_soak

pytestmark = pytest.mark.heavy


def test_control_plane_soak(short_tmp: Path, registry: Registry, base_image: str) -> None:
    clients, requests = scale(50, 100), scale(200, 1000)
    d, _ = standin_daemon(short_tmp, registry)
    try:
        ctx = write_context(short_tmp / "ctx", {"Dockerfile": f"FROM {base_image}\nRUN true\n"})
        built = run_build(d.socket_path, ctx, {"target_ref": f"{registry.host}/soak:1"})
        assert built.state == "succeeded", built
        log_size = len((Path(d.sections["daemon"]["state_dir"]) / "builds" / f"{built.id}.log")
                       .read_text())  # fmt: skip
        assert log_size > 0
        run_soak(d.socket_path, 4, 40, built.id, log_size)  # warm-up
        base_fds, _ = settled_census(d.pid, registry.port)
        base_rss = settled_rss_kb(d.pid)

        result = run_soak(d.socket_path, clients, requests, built.id, log_size)

        s = result.summary()
        print(
            f"\nsoak: {clients} clients x {requests} requests = {s['requests']:.0f} in "
            f"{s['seconds']:.2f}s ({s['rps']:.0f}/s), {s['events']:.0f} stream events; "
            f"p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, max {s['max_ms']:.1f} ms"
        )
        assert not result.errors, result.errors[:5]
        assert result.requests == clients * requests
        fds, _ = settled_census(d.pid, registry.port, base_fds)
        assert fds <= base_fds, f"fds {base_fds} -> {fds}"  # growth would be a leak
        rss = settled_rss_kb(d.pid)
        assert rss - base_rss < 12 * 1024, f"RSS grew {base_rss} -> {rss} KiB"
        assert d.ctl("ping").returncode == 0
    finally:
        d.stop()
        d.cleanup()
