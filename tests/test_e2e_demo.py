"""The README's first command, as dev/demo.sh runs it after installing: `build-agent dev --demo`
starts a registry and the daemon, builds examples/ twice (the second a cache hit), stops all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.build.child import descendants

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("buildah") is None or shutil.which("docker-registry") is None,
    reason="needs buildah and docker-registry",
)


def test_dev_demo_builds_examples_twice_and_stops_everything() -> None:
    before = set(os.listdir("/tmp"))
    ours = set(descendants(os.getpid()))  # session fixtures (registries) may be running
    r = subprocess.run(
        [sys.executable, "-m", "agent", "dev", "--demo"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("AGENT_")},
            "PYTHONPATH": str(REPO),
        },
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    refs = [ln for ln in r.stdout.splitlines() if "/workspace:" in ln and "@sha256:" in ln]
    assert len(refs) == 2 and refs[0] == refs[1], out  # the same pushed ref and digest twice
    assert "(base: built, workspace: built)" in out
    assert "(base: cache hit, workspace: cache hit)" in out
    assert "built by build-agent: hello from examples/" in out  # the RUN step's output
    assert "mode        development" in out  # agentctl info: the daemon knows it is in dev mode
    assert set(descendants(os.getpid())) <= ours
    leftovers = [p for p in set(os.listdir("/tmp")) - before if p.startswith("build-agent-dev-")]
    assert not leftovers
