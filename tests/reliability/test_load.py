"""Load: many mixed builds (cache hits, dedupe groups, fresh builds) against 2 slots and a short
queue, with many clients attached at once.

Every request ends in a final state or is refused ``busy`` (and then retried until taken); none
is lost; each build's record and log are complete; the daemon's fds return to their baseline and
its RSS to near it. Sizes: 40 requests / 40 clients by default, 200 / 50 with
RELIABILITY_SCALE=full. The toolchain is the BuildKit stand-ins (a fresh build costs a few
hundred ms), so volume is cheap; tests/reliability/test_faults_children.py runs real buildah.
"""

from __future__ import annotations

import random
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.infra.builds import metrics, tool_runs, wait_for, write_context
from tests.infra.registry import Registry
from tests.reliability._support import (
    Outcome,
    check_state_dir,
    run_build,
    scale,
    settled_census,
    settled_rss_kb,
    standin_daemon,
)

pytestmark = pytest.mark.heavy

RSS_SLACK_KB = 12 * 1024


def _log_tail(state_dir: Path, build_id: str, lines: int = 15) -> str:
    """The end of a build's log, so a failure here shows the builder's whole error."""
    path = state_dir / "builds" / f"{build_id}.log"
    if not build_id or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _retrying(socket_path: str, ctx: Path, args: dict[str, str]) -> tuple[Outcome, int]:
    """Submit until the daemon takes the request; returns the outcome and how often it was busy."""
    busy = 0
    deadline = time.monotonic() + 240
    while True:
        out = run_build(socket_path, ctx, args)
        if out.code != "busy":
            return out, busy
        busy += 1
        assert time.monotonic() < deadline, "still busy after 240 s"
        time.sleep(random.uniform(0.05, 0.3))  # a client backing off on busy


@pytest.mark.parametrize(
    "toolchain",
    [
        "buildkit",
        pytest.param(
            "buildah",
            marks=pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah"),
        ),
    ],
)
def test_mixed_builds_under_load(
    toolchain: str, short_tmp: Path, registry: Registry, base_image: str
) -> None:
    # Volume on the stand-ins (a few hundred ms a build); a handful of real buildah builds.
    n = scale(40, 200) if toolchain == "buildkit" else scale(8, 24)
    clients = min(n, 50)
    queue = 6 if toolchain == "buildkit" else 1
    d, _ = standin_daemon(
        short_tmp,
        registry,
        {"build": {"max_concurrent_builds": 2, "max_queued": queue, "toolchain": toolchain}},
    )
    try:
        state_dir = Path(d.sections["daemon"]["state_dir"])
        hit_ctx = write_context(short_tmp / "hit", {"Dockerfile": f"FROM {base_image}\n"})
        hit_target = f"{registry.host}/load-hit:1"
        warm = run_build(d.socket_path, hit_ctx, {"target_ref": hit_target})
        assert warm.state == "succeeded", warm
        # Warm every path once (fresh, hit, busy) before the baseline.
        fresh = write_context(short_tmp / "warm", {"Dockerfile": f"FROM {base_image}\nRUN true\n"})
        assert run_build(d.socket_path, fresh, {"target_ref": f"{registry.host}/w:1"}).state == (
            "succeeded"
        )
        assert run_build(d.socket_path, hit_ctx, {"target_ref": hit_target}).cache == {
            "base": True,
            "workspace": True,
        }
        base_fds, _ = settled_census(d.pid, registry.port)
        base_rss = settled_rss_kb(d.pid)
        builder_runs_before = tool_runs(d, "build")
        busy_before = metrics(d).get("build_agent_builds_refused_busy_total", 0.0)
        joins_before = metrics(d).get("build_agent_build_dedupe_joins_total", 0.0)

        # The mix: a quarter cache hits, a quarter in dedupe groups of 5, half fresh.
        jobs: list[tuple[str, Path, dict[str, str]]] = []
        groups = max(1, n // 20)
        group_ctx = [
            write_context(
                short_tmp / f"g{i}",
                {"Dockerfile": f"FROM {base_image}\nRUN echo group-{i}-{uuid.uuid4().hex}\n"},
            )
            for i in range(groups)
        ]
        for i in range(n):
            kind = ("hit", "dedupe", "fresh", "fresh")[i % 4]
            if kind == "hit":
                jobs.append((kind, hit_ctx, {"target_ref": hit_target}))
            elif kind == "dedupe":
                g = (i // 4) % groups
                jobs.append((f"dedupe{g}", group_ctx[g], {"target_ref": f"{registry.host}/g:{g}"}))
            else:
                ctx = write_context(
                    short_tmp / f"f{i}",
                    {"Dockerfile": f"FROM {base_image}\nRUN echo fresh-{i}-{uuid.uuid4().hex}\n"},
                )
                jobs.append((kind, ctx, {"target_ref": f"{registry.host}/f:{i}"}))

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            futures = [pool.submit(_retrying, d.socket_path, ctx, args) for _, ctx, args in jobs]
            results = [f.result() for f in futures]
        elapsed = time.monotonic() - t0
        outcomes = [o for o, _ in results]
        busy = sum(b for _, b in results)

        # Every request reached a final state (all of these can succeed), none was lost.
        bad = [o for o in outcomes if o.state != "succeeded"]
        assert not bad, (
            [(o, _log_tail(state_dir, o.id)) for o in bad[:3]],
            [ln for ln in d.log().splitlines() if '"error"' in ln or "Error" in ln][-5:],
        )
        assert all(o.id for o in outcomes)
        ids = {o.id for o in outcomes}
        assert busy > 0, f"the queue (2 slots + {queue} places) never overflowed"
        m = metrics(d)
        assert m["build_agent_builds_refused_busy_total"] - busy_before == busy
        joined = sum(o.joined for o in outcomes)
        assert m["build_agent_build_dedupe_joins_total"] - joins_before == joined
        # Each distinct build ran the builder at most once; cache hits not at all.
        builder_runs = tool_runs(d, "build") - builder_runs_before
        built = {o.id for o in outcomes if o.cache.get("base") is False}
        assert builder_runs == len(built)
        hits = [o for (kind, _, _), o in zip(jobs, outcomes, strict=True) if kind == "hit"]
        assert all(o.cache == {"base": True, "workspace": True} for o in hits)

        # Records and logs: one record per build id, final, its log is what callers streamed.
        with d.client() as c:
            listed = {b["id"]: b for b in c.call("list", {"limit": 10 * n})["builds"]}
        assert ids <= set(listed)
        assert all(listed[i]["state"] == "succeeded" for i in ids)
        records = {r["id"]: r for r in check_state_dir(state_dir)}
        for o in outcomes:
            text = (state_dir / "builds" / f"{o.id}.log").read_text()
            assert o.log_bytes == len(text), (o, len(text))
            assert records[o.id]["state"] == "succeeded"
        assert m["build_agent_builds_active"] == 0 and m["build_agent_builds_queued"] == 0

        # Resources back to baseline.
        fds, pooled = settled_census(d.pid, registry.port, base_fds)
        assert fds <= base_fds, f"fds {base_fds} -> {fds}"  # growth would be a leak
        assert pooled <= 64, f"{pooled} upstream connections kept (the pool's limit per host: 64)"
        rss = settled_rss_kb(d.pid)
        print(
            f"\nload ({toolchain}): {n} requests, {clients} clients, {len(ids)} builds "
            f"({len(built)} ran the builder, {joined} joins, {busy} busy refusals) "
            f"in {elapsed:.1f}s; "
            f"fds {base_fds}->{fds} (+{pooled} pooled upstream); RSS {base_rss}->{rss} KiB"
        )
        assert rss - base_rss < RSS_SLACK_KB, f"RSS grew {base_rss} -> {rss} KiB"
        wait_for(lambda: d.proc is not None and d.proc.poll() is None, 1, "daemon alive")
    finally:
        d.stop()
        d.cleanup()
