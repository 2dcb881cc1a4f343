"""``agentctl top``: one running and one queued build show up, in that order, with their ids."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from tests.infra.builds import detach, write_context
from tests.infra.registry import Registry
from tests.reliability._support import standin_daemon, wait_log


def test_top_shows_running_and_queued(short_tmp: Path, registry: Registry, base_image: str) -> None:
    d, _ = standin_daemon(short_tmp, registry, {"build": {"max_concurrent_builds": 1}})
    try:
        ids = []
        for name in ("first", "second"):
            marker = f"{name}-{uuid.uuid4().hex[:8]}"
            ctx = write_context(
                short_tmp / name,
                {"Dockerfile": f"FROM {base_image}\nRUN echo {marker} && sleep 60\n"},
            )
            ids.append(detach(d, ctx, f"{registry.host}/top:{name}"))
            if name == "first":
                wait_log(d, ids[0], marker)
        r = d.ctl("top", "--once")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert "running 1/1" in lines[0] and "queued 1/" in lines[0], lines[0]
        rows = [ln for ln in lines if ln.startswith(("running ", "queued "))]
        assert [(row.split()[0], row.split()[2]) for row in rows] == [
            ("running", ids[0]),
            ("queued", ids[1]),
        ]
        snap = json.loads(d.ctl("--json", "top").stdout)
        assert [b["id"] for b in snap["running"]] == [ids[0]]
        assert [b["id"] for b in snap["queued"]] == [ids[1]]
        for build_id in ids:
            assert d.ctl("cancel", build_id).returncode == 0
        r = d.ctl("top", "--once")
        assert "(no builds running or queued)" in r.stdout, r.stdout
    finally:
        d.stop()
        d.cleanup()
